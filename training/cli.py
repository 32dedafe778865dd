"""`train --config configs/<recipe>.yaml [--flag value ...]`: the fine-tuning launcher.

Every `TrainConfig` field is a flag with fms-hf-tuning's name (`--model_name_or_path`,
`--training_data_path`, `--peft_method lora|qlora|none`, `--lora_r`, ...);
flags override the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing

from training.config import TrainConfig
from training.trainer import train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else ()
        base = next((a for a in args if a is not type(None)), hint)
        if base is bool:
            p.add_argument(f"--{f.name}", type=lambda v: v.lower() in ("1", "true", "yes", "on"), metavar="BOOL")
        elif hint == (list[str] | str):
            p.add_argument(f"--{f.name}", help="comma-separated names, a regex, or all-linear")
        elif base in (int, float):
            p.add_argument(f"--{f.name}", type=base)
        else:
            p.add_argument(f"--{f.name}")
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    recipe = args.pop("config")
    overrides = {k: v for k, v in args.items() if v is not None}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = TrainConfig.from_yaml(recipe, **overrides) if recipe else TrainConfig(**overrides)
    except (TypeError, ValueError) as e:
        sys.exit(f"train: {e}")
    result = train(config)
    summary = {
        "output_dir": str(result.output_dir),
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "eval_losses": result.eval_losses,
        "stopped_early": result.stopped_early,
        "interrupted": result.interrupted,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
