# The HTML report (self-contained, offline) and the summary the demo prints.


rule report:
    input:
        db=f"{S}/cptscale.duckdb",
        fits=f"{S}/fits/summary.json",  # the CPT compute saving section reads it
    output:
        html=report(f"{S}/report/index.html", caption="../report/index.rst", category="Report"),
        figures=report(
            directory(f"{S}/report/figures"),
            patterns=["{name}.svg"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        title=CFG.report.title or CFG.study,
        max_points=CFG.report.max_points,
    log:
        f"{LOGS}/report.log",
    shell:
        "cptscale report --db {input.db} --study {CFG.study} --out-dir $(dirname {output.html})"
        " --title {params.title:q} --max-points {params.max_points}"
        " --config {CONFIG_FILE:q} 2> {log}"


rule summary:
    input:
        db=f"{S}/cptscale.duckdb",
        html=f"{S}/report/index.html",
    output:
        f"{S}/summary.json",
    shell:
        "cptscale summary --config {CONFIG_FILE:q} --out {output}"
