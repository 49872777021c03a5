"""Ship a trained model: its weights and model card (JSON and Markdown) in the package's
``CARLRegistration/carlreg/weights`` (package data: every install finds them there).

The weights are the run's ``model.pt`` (a state_dict); the card takes the architecture and
training settings from the run's ``config.json``, the wall-clock time from its ``log.jsonl``,
and the metrics from the JSON a bench script wrote by evaluating these shipped weights (it
records their SHA256; rerunning the script reproduces the card). So shipping takes two passes:
ship (card without metrics), run the bench script, ship again. All three files are written
under temporary names and renamed together.

``--refresh`` rewrites a shipped model's card (metrics, input text) from the bench JSON and its
committed training config, without the run folder (which stays on the machine that trained):
for a change of the engine that changes the figures of the same weights.

Usage: python weights/ship.py NAME [--run weights/training/NAME] [--metrics bench/results/X.json]
       python weights/ship.py NAME --refresh [--metrics bench/results/X.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CARLRegistration"))

from carlreg.io import atomic_outputs  # noqa: E402
from carlreg.registry import WEIGHTS_DIR, sha256_of  # noqa: E402
from carlreg.train import load_checkpoint  # noqa: E402

RETINA_INPUT = (
    "a 2-D retina vessel map in [0, 1] (1 = field of view away from vessels): the 584 × 565 DRIVE "
    "segmentation on a canvas padded with 200 rows at the bottom, average-pooled by 4 to 196 × 141 "
    "(carlreg.retina)"
)
BRAIN_INPUT = (
    "a 3-D head scan reoriented to RAS, intensities scaled to [0, 1] (the modality setting: MR "
    "percentiles 0.5-99.5 by default), sampled at {spacing_mm:g} mm on a {shape} grid centred on the image "
    "(carlreg.geometry.to_network); trained on images synthesised from brain label maps with random "
    "contrast, blur, bias field and noise, on a {background} (carlreg.data), so not tied to one MR contrast"
)
#: the card's words for each synthesised background (carlreg.data.BACKGROUNDS)
BACKGROUND_TEXT = {"random": "dark grey background", "dark": "black background, as in scans scaled to their own range"}
#: what the run's config does not say: purpose, input (``{shape}``, ``{spacing_mm}``: the run's), and
#: which bench result holds the metrics
MODELS = {
    "carl-retina-2d": {
        "title": "CARL for the paper's 2-D retina experiment (§6.1)",
        "modality": "retina vessel map (2-D)",
        "preprocessing": RETINA_INPUT,
        "metrics_file": "bench/results/retina.json",
        "metrics_method": "CARL",
        "use": "research: reproduces the paper's Fig. 3 finding; not for clinical images",
    },
    "unet-retina-2d": {
        "title": "Displacement-only network (the paper's variant 1: a U-Net first step), retina experiment",
        "modality": "retina vessel map (2-D)",
        "preprocessing": RETINA_INPUT,
        "metrics_file": "bench/results/retina.json",
        "metrics_method": "displacement-only",
        "baseline_for": "carl-retina-2d",
        "use": "research: the baseline CARL is compared with; not for clinical images",
    },
    "carl-brain-3d": {
        "title": "CARL for 3-D brain MR, any contrast",
        "modality": "brain MR (3-D), whole head",
        "preprocessing": BRAIN_INPUT,
        "metrics_file": "bench/results/brain.json",
        "metrics_method": "ours",
        "io_method": "ours_io",
        #: the run its weights come from (default: weights/training/NAME)
        "run": "weights/training/carl-brain-3d-masked60",
        "use": "research and evaluation: deformable brain MR registration without pre-alignment; not for clinical decisions",
    },
    "unet-brain-3d": {
        "title": "Displacement-only network (the paper's variant 1: a U-Net first step), brain MR",
        "modality": "brain MR (3-D), whole head",
        "preprocessing": BRAIN_INPUT.replace("{shape}", "{shape} (its U-Net first step needs ≥ 65 voxels per axis)"),
        "metrics_file": "bench/results/brain.json",
        "metrics_method": "displacement_only",
        "baseline_for": "carl-brain-3d",
        "run": "weights/training/unet-brain-3d-masked60",
        "use": "research: the baseline CARL is compared with in bench/brain.py; not for clinical images",
    },
}


def _initialised_from(name: str, config: dict):
    """Where a run that started from another's weights (``init_from``) started: the file, and its
    step when it is a training checkpoint; None for a run from a random initialisation. Checkpoints
    stay on the machine that trained: where the file is gone, the shipped card still says it."""
    source = config.get("init_from")
    if not source:
        return None
    shipped = WEIGHTS_DIR / f"{name}.json"
    # a run from the shipped weights replaces that very file: the first pass records its hash
    replaced = (REPO / source).resolve() == (WEIGHTS_DIR / f"{name}.pt").resolve()
    if (replaced or not (REPO / source).is_file()) and shipped.is_file():
        known = json.loads(shipped.read_text())["training"].get("initialised_from")
        if known and known["file"] == source:
            return known
    state = load_checkpoint(REPO / source)
    return {"file": source, "step": int(state["step"]) if "step" in state else None, "sha256": sha256_of(REPO / source)}


def _hardware(records: list) -> str:
    """Where the run's steps ran, from its log: ``"N steps, H h on DEVICE"`` per device, in order
    of first use (records from before the log named devices: a CPU)."""
    summary: dict = {}
    for record in records:
        steps, seconds = summary.get(record.get("device", "CPU (not logged)"), (0, 0.0))
        summary[record.get("device", "CPU (not logged)")] = (steps + 1, seconds + record.get("seconds", 0.0))
    return "; ".join(f"{steps} step{'s' * (steps != 1)}, {seconds / 3600:.2f} h on {device}"
                     for device, (steps, seconds) in summary.items())


def _metrics_of(name: str, sha256: str, metrics_path: Path) -> dict:
    """The card's metrics: the bench JSON's figures for these weights, or what is pending."""
    info = MODELS[name]
    card_metrics = {"source": f"pending: ship, run python bench/{metrics_path.stem}.py, ship again"}
    if not metrics_path.is_file():
        return card_metrics
    metrics = json.loads(metrics_path.read_text())
    method = info["metrics_method"]
    if metrics["models"].get(method) != name or metrics["weights_sha256"].get(method) != sha256:
        return card_metrics
    card_metrics = {
        "source": f"{metrics_path.relative_to(REPO)} (rerun: python bench/{metrics_path.stem}.py)",
        "test_pairs": metrics["summary"][method],
        "no_registration": metrics["summary"]["none"],
    }
    io_method = info.get("io_method")
    if io_method in metrics["summary"] and metrics["weights_sha256"].get(io_method) == sha256:
        card_metrics["with_instance_optimization"] = dict(metrics["summary"][io_method], steps=metrics["io_steps"])
    return card_metrics


def _preprocessing(name: str, config: dict) -> str:
    # the pipeline runs a network on the box it was trained on (carlreg.pipeline._network_box)
    return MODELS[name]["preprocessing"].format(
        shape=" × ".join(map(str, config.get("box_shape") or config["input_shape"])), spacing_mm=config.get("spacing_mm"),
        background=BACKGROUND_TEXT[config.get("background", "random")])


def refreshed_card(name: str, metrics_path: Path) -> dict:
    """The shipped card with its metrics and input text recomputed (``--refresh``)."""
    card = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    if sha256_of(WEIGHTS_DIR / card["file"]) != card["sha256"]:
        raise SystemExit(f"ship.py --refresh: {card['file']} does not match its card's SHA256")
    config = json.loads((REPO / card["training"]["config"]).read_text())
    return dict(card, preprocessing=_preprocessing(name, config), metrics=_metrics_of(name, card["sha256"], metrics_path))


def _augmentation(config: dict) -> Optional[str]:
    """The training pairs' translations and cuts (synthseg3d; None for the other sources)."""
    if config["data"] != "synthseg3d":
        return None
    words = [f"each image moved by up to ±{config['max_shift'] * config['spacing_mm']:g} mm per axis "
             f"(shifts `{config.get('shifts', 'each')}`)"]
    if config.get("field_of_view_mm"):
        words.append(f"cut to a field of view of {config['field_of_view_mm']:g} mm or more, centred in the box")
    if config.get("mask_similarity"):
        words.append("the similarity taken where both images are valid")
    if config.get("label_weight"):
        words.append(f"the label maps' Dice added with weight {config['label_weight']:g}")
    return ", ".join(words)


def _weights_of(config: dict, steps: int) -> str:
    """Which weights the run's model.pt holds: the last step's, or their average (carlreg.train)."""
    if not config.get("ema_decay"):
        return f"the weights of step {steps}"
    return (f"the average of the trained weights of steps {config.get('ema_start', 0) + 1}–{steps}, step i of t "
            f"weighted by {config['ema_decay']:g}^(t − i), normalised")


def card_for(name: str, run: Path, metrics_path: Path) -> dict:
    info = MODELS[name]
    config = json.loads((run / "config.json").read_text())
    # the training log: one record per step (their seconds add up to the wall-clock time)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    sha256 = sha256_of(run / "model.pt")
    card_metrics = _metrics_of(name, sha256, metrics_path)
    return {
        "name": name,
        "title": info["title"],
        "file": f"{name}.pt",
        "sha256": sha256,
        "architecture": {
            "dimension": len(config["input_shape"]),
            "input_shape": config["input_shape"],
            "variant": config["variant"],
            "fourth_step": config["fourth_step"],
            "width": config["width"],
            "first_step": config["first_step"],
            # synthseg3d trains on boxes of a physical spacing; the other sources resize whole arrays
            "input_spacing_mm": config["spacing_mm"] if config["data"] == "synthseg3d" else None,
            # the largest box it was trained on (carlreg.network.CARLConfig.trained_box)
            "box_shape": config.get("box_shape") or None,
        },
        "modality": info["modality"],
        "preprocessing": _preprocessing(name, config),
        "training": {
            "data": config["data"],
            "retina_variant": config.get("retina_variant") if config["data"] == "drive2d" else None,
            "steps": records[-1]["step"],
            "diffusion_steps": config["diffusion_steps"],
            "batch_size": config["batch_size"],
            "learning_rate": config["learning_rate"],
            "lambda": config["lmbda"],
            "lncc_sigma": config["sigma"],
            "seed": config["seed"],
            "config": f"weights/training/{run.name}.json",
            "initialised_from": _initialised_from(name, config),
            "wall_clock_hours": round(sum(r.get("seconds", 0.0) for r in records) / 3600, 2),
            "hardware": _hardware(records),
            "augmentation": _augmentation(config),
            "weights": _weights_of(config, records[-1]["step"]),
        },
        "metrics": card_metrics,
        "use": info["use"],
        "baseline_for": info.get("baseline_for"),
        "license": "Apache-2.0 (weights); trained on DRIVE, released for research use" if config["data"] == "drive2d" else "Apache-2.0",
    }


def markdown(card: dict) -> str:
    architecture, training = card["architecture"], card["training"]
    lines = [
        f"# {card['name']}: {card['title']}",
        "",
        f"- File: `{card['file']}` (state_dict; `torch.load(path, weights_only=True)`), SHA256 `{card['sha256']}`",
        f"- Architecture: CARL `{architecture['variant']}`, first step `{architecture['first_step']}`, "
        f"fourth step {'yes' if architecture['fourth_step'] else 'no'}, width {architecture['width']}, "
        f"{architecture['dimension']}-D input {' × '.join(map(str, architecture['input_shape']))}"
        + (f", trained and run on a {' × '.join(map(str, architecture['box_shape']))} box"
           if architecture.get("box_shape") else ""),
        f"- Modality: {card['modality']}",
        f"- Input: {card['preprocessing']}",
        f"- Training: `{training['data']}`{' (' + training['retina_variant'] + ')' if training['retina_variant'] else ''}, "
        f"{training['steps']} steps ({training['diffusion_steps']} diffusion warm-up, then GradICON), batch "
        f"{training['batch_size']}, Adam lr {training['learning_rate']}, λ {training['lambda']}, LNCC σ {training['lncc_sigma']}, "
        f"seed {training['seed']}; config `{training['config']}`"
        + (f"; started from the weights of `{training['initialised_from']['file']}`"
           + (f" (step {training['initialised_from']['step']})" if training["initialised_from"]["step"] is not None else "")
           + (f", SHA256 `{training['initialised_from']['sha256'][:12]}…`" if training["initialised_from"].get("sha256") else "")
           if training.get("initialised_from") else ""),
        *([f"- Training pairs: {training['augmentation']}"] if training.get("augmentation") else []),
        *([f"- Weights: {training['weights']}"] if training.get("weights") else []),
        f"- Wall-clock training time: {training['wall_clock_hours']} h — {training['hardware']}",
        f"- Use: {card['use']}" + (f" (the baseline of `{card['baseline_for']}`)" if card.get("baseline_for") else ""),
        f"- Licence: {card['license']}",
        "",
        f"## Metrics on untouched test pairs ({card['metrics']['source']})",
        "",
    ]
    if "test_pairs" not in card["metrics"]:
        return "\n".join(lines) + "\n"
    lines += ["| test set | pairs | Dice before | Dice after (mean ± sd) | folding % |", "|---|---|---|---|---|"]
    for test_set, figures in card["metrics"]["test_pairs"].items():
        before = card["metrics"]["no_registration"][test_set]["dice"]
        lines.append(
            f"| {test_set} | {figures['pairs']} | {before:.3f} | {figures['dice']:.3f} ± {figures['dice_sd']:.3f} "
            f"| {figures['folding_percent']:.3f} |"
        )
    tuned = card["metrics"].get("with_instance_optimization")
    if tuned:
        for test_set, figures in tuned.items():
            if isinstance(figures, dict):
                lines.append(
                    f"| {test_set}, with {tuned['steps']} steps of instance optimization | {figures['pairs']} | "
                    f"{card['metrics']['no_registration'][test_set]['dice']:.3f} | "
                    f"{figures['dice']:.3f} ± {figures['dice_sd']:.3f} | {figures['folding_percent']:.3f} |"
                )
    timed = [(name, figures) for name, figures in card["metrics"]["test_pairs"].items() if "seconds" in figures]
    for test_set, figures in timed:
        lines += ["", f"Time per pair ({test_set}, 2 CPU threads, no instance optimization): {figures['seconds']:.1f} s; "
                      f"peak memory {figures['peak_rss_gib']:.2f} GiB."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--run", type=Path, help="training run folder (default: the model's run, else weights/training/NAME)")
    parser.add_argument("--metrics", type=Path, help="bench result JSON (default: the model's)")
    parser.add_argument("--refresh", action="store_true", help="rewrite the shipped card only (no run folder needed)")
    args = parser.parse_args(argv)
    metrics = (args.metrics or REPO / MODELS[args.name]["metrics_file"]).resolve()
    target = WEIGHTS_DIR
    if args.refresh:
        card = refreshed_card(args.name, metrics)
    else:
        run = args.run or REPO / MODELS[args.name].get("run", f"weights/training/{args.name}")
        card = card_for(args.name, run, metrics)
    with atomic_outputs() as reserve:
        if not args.refresh:
            shutil.copyfile(run / "model.pt", reserve(target / card["file"]))
        reserve(target / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
        reserve(target / f"{args.name}.md").write_text(markdown(card))
    print(f"{'refreshed' if args.refresh else 'shipped'} {args.name}: {target / card['file']} "
          f"({card['sha256'][:12]}…), card {args.name}.json/.md")


if __name__ == "__main__":
    main()
