"""brain-synth: PDD and RD4AD trained the same way (same data, epochs, schedule), plus the feature-cache speed-up.

    python benchmarks/brain_synth.py [--count 160] [--image-size 128] [--epochs 8] [--out benchmarks/results]

Writes ``brain-synth.json`` and ``brain-synth.md``. Teachers are randomly initialised (no weights can be
downloaded where this runs), so the numbers compare the two methods' machinery on equal footing, not
the published accuracy; with pretrained teachers pass ``--set vmamba_weights=... --set wrn_weights=...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdd.checkpoint import load_model
from pdd.config import apply_overrides, atomic_write_text, resolve_config
from pdd.data import generate_brain_synth
from pdd.evaluate import evaluate, metrics_table
from pdd.train import open_dataset, train


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=160)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both models")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--work", type=Path, help="keep data and runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = args.work or Path(tempfile.mkdtemp(prefix="pdd-brain-synth-"))
    data = work / "data"
    generate_brain_synth(data, seed=args.seed, count=args.count, image_size=args.image_size, overwrite=True)
    common = [f"image_size={args.image_size}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
              f"train.cosine_t_max={args.epochs}", "train.eval_every=1", f"train.seed={args.seed}",
              f"data.root={data}", f"train.amp={'true' if device == 'cuda' else 'false'}", *args.set]
    results: dict = {"models": {}}
    # PDD twice: the released "+cos" prior term (default) and the conventional "1 − cos" (model.md asks for both).
    variants = (("pdd (+cos)", "brain-synth", "pdd-plus-cos", ["loss.prior_cos_form=plus_cos"]),
                ("pdd (1 − cos)", "brain-synth", "pdd-one-minus-cos", ["loss.prior_cos_form=one_minus_cos"]),
                ("rd4ad", "rd4ad-brain-synth", "rd4ad", []))
    for label, name, sub, extra in variants:
        cfg = apply_overrides(resolve_config(name), [*common, *extra])
        folder = work / sub
        t0 = time.perf_counter()
        run = train(cfg, folder, device=device)
        train_s = time.perf_counter() - t0
        model = load_model(run.best_checkpoint, device=device)
        ev = evaluate(model, open_dataset(cfg.data, "test", cfg.image_size), folder / "eval", device=device,
                      report=False)
        results["models"][label] = {"metrics": ev.metrics, "train_seconds": train_s, "best_epoch": run.best_epoch,
                                    "history": run.history, "overrides": extra}
        print(f"{label}: image AUROC {ev.metrics['mean']['image_auroc']:.4f}", flush=True)

    # Feature cache: the same PDD epochs with and without cached teacher features.
    speed = {}
    for cache in ("none", "memory"):
        overrides = [*common, "train.epochs=2", f"train.feature_cache={cache}"]
        cfg = apply_overrides(resolve_config("brain-synth"), overrides)
        run = train(cfg, work / f"cache-{cache}", device=device)
        speed[cache] = {"epoch_seconds": [h["seconds"] for h in run.history],
                        "cache_seconds": run.history[0].get("feature_cache_seconds", 0.0)}
    speed["speedup_per_epoch"] = speed["none"]["epoch_seconds"][-1] / speed["memory"]["epoch_seconds"][-1]
    results["feature_cache"] = speed
    results.update({
        "command": "python benchmarks/brain_synth.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "count": args.count, "image_size": args.image_size,
        "epochs": args.epochs, "teachers": "randomly initialised" if not args.set else "as overridden",
    })
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "brain-synth.json", json.dumps(results, indent=2))
    lines = [
        "# brain-synth: PDD vs RD4AD, trained the same way", "",
        f"Command: `{results['command']}`  ",
        f"{args.count} images at {args.image_size}², {args.epochs} epochs, batch {args.batch_size}, device {device}, "
        f"torch {torch.__version__}; teachers {results['teachers']} — these numbers compare the methods' "
        "machinery on equal footing, not the published accuracy. Best epoch chosen on held-out normal images.", "",
    ]
    lines += ["PDD is trained with both forms of its prior-cosine loss term: `+cos` as released (it pushes the prior",
              "student away from the target in angle, so 1 − cos(a, t) is large everywhere and the prior student's",
              "maps invert) and the conventional `1 − cos` (`loss.prior_cos_form=one_minus_cos`).", ""]
    for label, r in results["models"].items():
        lines += [f"## {label.upper()} (best epoch {r['best_epoch']}, training {r['train_seconds']:.0f} s)", "",
                  metrics_table(r["metrics"]), ""]
    lines += ["## Frozen-teacher feature cache", "",
              f"PDD epoch time without cache {speed['none']['epoch_seconds'][-1]:.1f} s, with the in-memory fp16 cache "
              f"{speed['memory']['epoch_seconds'][-1]:.1f} s: **{speed['speedup_per_epoch']:.1f}x** per epoch "
              f"(one-off cache build {speed['memory']['cache_seconds']:.1f} s).", ""]
    atomic_write_text(args.out / "brain-synth.md", "\n".join(lines))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
