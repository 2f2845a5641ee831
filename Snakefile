# cptscale: the whole cross-lingual CPT scaling study as one Snakemake DAG.
#
#   snakemake --profile workflow/profiles/local                      # default study (config.yaml)
#   snakemake --profile workflow/profiles/local --configfile my.yaml # another study
#   snakemake --profile workflow/profiles/slurm --configfile my.yaml # on a SLURM cluster
#
# The study config is validated (typed schema, then the JSON schema generated from it) before any job runs; every run, path and
# resource below is derived from it by cptscale.plan. Rules are thin: one `cptscale` call each.

import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

if not config:
    configfile: "config.yaml"

from cptscale.config.checks import resolve_corpora  # noqa: E402
from cptscale.config.problems import ConfigError  # noqa: E402
from cptscale.validation import parse_config  # noqa: E402
from cptscale import plan as P  # noqa: E402
from cptscale import source_model as SM  # noqa: E402

_CONFIG_FILE = Path(workflow.configfiles[-1]) if workflow.configfiles else Path("config.yaml")
# The typed schema first: it reports every problem with its field path, value and what is allowed
# (the JSON schema generated from it stops at the first problem, with a long jsonschema dump).
try:
    CFG = parse_config(config, base_dir=_CONFIG_FILE.resolve().parent, where=str(_CONFIG_FILE))
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
validate(config, "workflow/schemas/config.schema.json")

# Jobs call the `cptscale` of the environment Snakemake runs in (also inside SLURM allocations).
shell.prefix(f'export PATH="{Path(sys.executable).parent}:$PATH"; ')

S = str(CFG.study_dir)
CONFIG_FILE = str(_CONFIG_FILE)
RUNS = {r.run_id: r for r in P.plan_study(CFG)}
# transfer metrics pair CPT runs with same-size scratch runs; IPLT arms (cptscale.iplt) are compared with each other
CPT_RUNS = [r for r in RUNS.values() if r.init == "cpt" and not r.arm and r.parent]
# CPT of an existing model (source_model:): the imported model's eval and the study kind's fit (rules/existing.smk)
EXISTING = CFG.source_model is not None
LANGS = CFG.languages.all
LOGS = f"{S}/logs"
# fit.next_run_budget: after the fits, train the suggested compute-optimal run of each target language
NEXT_RUNS = [P.next_run_id(lang) for lang in CFG.languages.targets] if CFG.fit.next_run_budget else []


def _alternatives(names):
    return P.id_pattern(names)  # a trie: a flat alternation made matching grow with the square of the runs


wildcard_constraints:
    lang="|".join(LANGS),
    run=_alternatives([*RUNS, *NEXT_RUNS]),

# Bookkeeping rules that read and write small JSON/CSV files run where Snakemake runs, not as cluster
# jobs (a SLURM job costs ~15 s of scheduling for a second of work).
localrules:
    all,
    corpus_sources,
    study_manifest,
    run_spec,
    next_run_spec,
    next_run_check,
    transfer,
    points,
    summary,


# One run per study: a second `snakemake` on the same study (from any directory) is refused with the
# holder's pid and start time instead of racing it; the lock dies with the process (nothing to unlock).
onstart:
    from cptscale.integrity import StudyBusyError, hold_study_lock

    try:
        hold_study_lock(CFG.study_dir)
    except StudyBusyError as exc:
        sys.exit(f"cptscale: error: {exc}")


include: "workflow/rules/common.smk"


# train.backend: simulate (never the default): the data stage is replaced by simulated manifests and
# every run's outputs come from a law file (cptscale.simulate); everything downstream is unchanged
if CFG.train.backend == "simulate":

    include: "workflow/rules/simulate.smk"

    localrules:
        simulated_data,
        simulated_tokenizer,

else:

    include: "workflow/rules/data.smk"


include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"


if EXISTING:

    include: "workflow/rules/existing.smk"


rule all:
    input:
        f"{S}/report/index.html",
        f"{S}/summary.json",
    default_target: True


# Partition and account from the study config (slurm.partition / slurm.account) for every rule: a rule's
# own setting, --set-resources and --default-resources on the command line win.
for _rule in workflow.rules:
    for _key, _value in slurm_common().items():
        _rule.resources.setdefault(_key, _value)
