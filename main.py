"""Train GPT-2: `python main.py [group=option ...] [key=value ...]`.

Works under torchrun (`torchrun --nproc_per_node=N main.py trainer=ddp ...`) and the
DeepSpeed launcher (`deepspeed --num_gpus=N main.py trainer=deepspeed ...`, which appends
`--local_rank=N`). Exit codes: 0 done, 2 bad input, 75 stopped after a checkpoint (requeue),
76 an infrastructure failure (a lost peer, a hang, a broken communication: retry from the last
checkpoint; the watchdog ends a rank with it, and so does a communication error here).
"""

from __future__ import annotations

import os
import sys

from gpt2.errors import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE, UserError, one_line, report


def split_args(argv: list[str]) -> list[str]:
    """Hydra-style overrides, with the DeepSpeed launcher's --local_rank taken out."""
    overrides, it = [], iter(argv)
    for arg in it:
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "0")
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            overrides.append(arg)
    return overrides


def main(argv: list[str]) -> int:
    from gpt2.compose import load_config
    from gpt2.train import run

    try:
        cfg = load_config(split_args(argv))
        outcome = run(cfg)
    except (UserError, OSError) as exc:
        return report(exc)
    except RuntimeError as exc:
        from gpt2.watchdog import is_comm_error

        if not is_comm_error(exc):
            raise  # a bug: its traceback, exit 1
        # a peer is gone (its report and traceback are in the run's failures/): retry, not a bug here
        print(one_line(f"communication with another rank failed ({exc}); rerun to resume from the "
                       "last checkpoint"), file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if outcome.status == "done" else EXIT_REQUEUE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
