"""Sample from a checkpoint: `python -m gpt2.generate RUN_DIR --prompt "..." [options]`.

RUN_DIR is a run directory (its newest checkpoint that verifies), a checkpoints directory or
one `step_XXXXXXXX/` checkpoint, of any backend. The model's shape comes from the manifest's
resolved config; the prompt is encoded with GPT-2's tokenizer (gpt2.tokenizer). Prints each
sample (prompt included) to stdout, separated by a line of dashes. Exit codes: 0, or 2 for bad
input (one line on stderr).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from gpt2.errors import EXIT_OK, ArgumentParser, UserError, report


def sample(model: torch.nn.Module, prompt: str, *, max_new_tokens: int = 100, temperature: float = 0.8,
           top_k: int | None = 200, num_samples: int = 1, seed: int = 1337,
           device: torch.device | str = "cpu") -> list[str]:
    """`num_samples` continuations of `prompt` (prompt included), decoded; deterministic for a seed."""
    from gpt2.tokenizer import EOT, get_encoding

    enc = get_encoding()
    ids = enc.encode_ordinary(prompt) or [EOT]  # an empty prompt starts a new document
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    with torch.no_grad():
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return [enc.decode(row.tolist()) for row in y]


def nonfinite_weight(model: torch.nn.Module) -> str | None:
    """The name of the first weight holding a NaN or an infinity (a diverged run), or None:
    sampling from such a model fails in torch.multinomial."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m gpt2.generate", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="run directory, checkpoints directory or step_XXXXXXXX checkpoint")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="0 = no top-k filtering")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no_checksums", action="store_true", help="check file sizes only, not sha256")
    args = p.parse_args(argv)
    try:
        for name in ("max_new_tokens", "num_samples"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name} must be >= 1 (got {getattr(args, name)})")
        if not math.isfinite(args.temperature) or args.temperature < 0 or args.top_k < 0:
            raise UserError("--temperature and --top_k must be finite numbers >= 0")
        if args.device not in ("auto", "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
            raise UserError(f"--device {args.device}: choose auto, cpu, or cuda on a machine with a GPU")
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")

        from gpt2.export import load_model

        model, manifest, ckpt = load_model(args.path, checksums=not args.no_checksums)
        bad = nonfinite_weight(model)
        if bad is not None:
            raise UserError(f"{ckpt}: the weights hold NaN or inf ({bad}): the run diverged before this step; "
                            "sample from an earlier checkpoint (give its step_XXXXXXXX directory)")
        try:
            texts = sample(model.to(device), args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k or None, num_samples=args.num_samples,
                           seed=args.seed, device=device)
        except FloatingPointError as exc:  # finite weights whose logits overflow, or a tiny temperature
            raise UserError(f"{ckpt}: {exc} (temperature {args.temperature}): the weights overflow or the "
                            "temperature is too small; raise --temperature, use 0 for greedy, or sample from "
                            "an earlier checkpoint") from None
    except (UserError, OSError) as exc:
        return report(exc)
    print(f"# {ckpt} (step {manifest.get('step')}, {manifest.get('backend')})", file=sys.stderr)
    print("\n---------------\n".join(texts))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
