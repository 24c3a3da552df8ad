"""Render an experiment as one plain sbatch script, for users who submit by hand.

    python launch/render.py jobs/X.yaml [key=value ...] [--name NAME] [-o FILE]

The script comes from `slurm_templates/sbatch.tmpl` (string.Template, no extra dependency) and
the same experiment, cluster profile and plan as `launch/sweep.py`: the same resources, one task
per GPU, `--signal=USR2@<lead>`, `--requeue`, and a job array with one case per job. Each rank
runs `launch/job.py`, which trains and requeues exactly as under submitit, but from the working
tree (no code snapshot, no sweep record). Every `#SBATCH` value is checked against what SLURM accepts
for its option (launch/slurm.py) and no control character reaches any line; values are also
shell-quoted (and Hydra-quoted inside overrides), so a config value cannot inject shell.
`render()` is a pure function of its inputs: tests compare its text with a golden file.
"""

from __future__ import annotations

import shlex
import string
import sys
from pathlib import Path

from gpt2.errors import ArgumentParser, UserError, report
from launch.executors import check_inputs, resource_fields, setup_lines
from launch.experiment import (
    PROFILES_DIR,
    ClusterProfile,
    Composer,
    Experiment,
    check_resources,
    load_experiment,
    load_profile,
    override_value,
    runs_root,
)
from launch.paths import child
from launch.plan import make_plan, signal_lead_s
from launch.record import atomic_write
from launch.slurm import check_line, check_sbatch_options

TEMPLATE = PROFILES_DIR / "sbatch.tmpl"


def render(exp: Experiment, profile: ClusterProfile, sweep_dir: Path, lead_s: int) -> str:
    """The sbatch script text for every job of `exp` (an array when there is more than one)."""
    r = exp.resources
    check_inputs(sweep_dir.name, r, profile, [ov for j in exp.jobs for ov in j.overrides])
    if len(exp.jobs) > profile.max_array_size:
        raise UserError(f"{len(exp.jobs)} jobs exceed MaxArraySize {profile.max_array_size} for one script: "
                        f"submit with launch/sweep.py, which splits arrays")
    logs = sweep_dir / "logs"
    array = len(exp.jobs) > 1
    flags: dict[str, object] = {
        "job-name": sweep_dir.name,
        **{k.replace("_", "-"): v for k, v in resource_fields(r, profile).items()},
        "signal": f"USR2@{lead_s}",
        "requeue" if r.requeue else "no-requeue": True,
        "open-mode": "append",
        "output": str(logs / ("%A_%a.out" if array else "%j.out")),
        "error": str(logs / ("%A_%a.err" if array else "%j.err")),
        "array": f"0-{len(exp.jobs) - 1}%{min(len(exp.jobs), r.array_parallelism)}" if array else None,
    }
    check_sbatch_options(flags, {"job-name": "the sweep name", "signal": "resources.signal_lead_s",
                                 "output": "the sweep's log folder", "error": "the sweep's log folder"})
    directives = "\n".join(
        f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={shlex.quote(str(v))}"
        for k, v in sorted(flags.items()) if v is not None
    )
    setup = setup_lines(profile)
    cases = []
    for i, job in enumerate(exp.jobs):
        run_dir = child(sweep_dir, job.name, "job")
        first = ["run.device=cpu"] if r.gpus_per_node == 0 else []  # the job's own overrides may change it
        launch = [f"run.dir={override_value(str(run_dir))}", f"run.sweep={override_value(sweep_dir.name)}",
                  f"run.job={override_value(job.name)}"]
        overrides = " ".join(shlex.quote(o) for o in first + job.overrides + launch)
        cases.append(f"  {i}) JOB={shlex.quote(job.name)}\n     OVERRIDES=({overrides}) ;;")
    job_flags = " ".join([
        f"--sweep-dir {shlex.quote(str(sweep_dir))}", f"--time-limit-min {r.time}", f"--signal-lead-s {lead_s}",
        f"--max-timeouts {r.max_timeouts}", f"--max-failures {r.max_failures}",
        *([] if r.requeue else ["--no-requeue"]),
    ])
    description = check_line(f"{exp.path}: description", exp.description.strip())
    title = f"{exp.name}: {description}" if description else exp.name
    return string.Template(TEMPLATE.read_text()).substitute(
        title=title, experiment=check_line("the experiment path", exp.path), cluster=profile.name,
        logs_dir=shlex.quote(str(logs)), directives=directives, setup="\n".join(setup),
        cases="\n".join(cases), job_flags=job_flags,
    )


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="launch/render.py", description="Render an experiment as a plain sbatch script.")
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--name", help="sweep name (default: the experiment's)")
    p.add_argument("-o", "--output", type=Path, help="write here (and create the log directory) instead of stdout")
    args = p.parse_intermixed_args(argv)
    try:
        for ov in args.overrides:
            check_line("command-line override", ov)
        exp = load_experiment(args.experiment, args.overrides)
        sweep_dir = child(runs_root(), args.name or exp.name, "--name" if args.name else "the experiment name")
        profile = load_profile(exp.cluster)
        check_inputs(sweep_dir.name, exp.resources, profile, [ov for j in exp.jobs for ov in j.overrides])
        check_resources(exp.resources, profile, "slurm")
        resolver = Composer()
        plans = [make_plan(resolver.compose(j.overrides), exp.resources.world_size) for j in exp.jobs]
        r = exp.resources
        lead = max(signal_lead_s(pl, r.time, profile.min_signal_lead_s, profile.checkpoint_write_mb_s,
                                 r.signal_lead_s) for pl in plans)
        text = render(exp, profile, sweep_dir, lead)
        if args.output:
            atomic_write(args.output, text)
            (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    except (UserError, OSError) as exc:
        return report(exc)
    if args.output:
        print(f"wrote {args.output}: submit with `sbatch {args.output}` from the repository root")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
