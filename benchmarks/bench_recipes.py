"""Test accuracy and training time of the recipes (chapter, fast, accurate, photos) and networks on datasets.

A recipe is NAME or NAME:NETWORK (e.g. accurate:chapter, photos:resnet); without a network it takes the
recipe's own ("auto" for chapter, fast and accurate: the chapter's CNN for gray images, the ResNet for
color ones). Each (recipe, dataset, seed) trains once through `cnnkit train`'s own code (runs.start_run), with the
dataset's full training split (--valid-size 0: the settings were chosen on validation splits before),
then scores the test split. Prints one JSON line per run and the medians over seeds per (recipe, dataset).
Training time is the sum of the epochs' times (training and validation; checkpoints and reading excluded).

    python3 benchmarks/bench_recipes.py [--recipes chapter,fast,accurate] [--datasets mnist-5k,fashion-mnist]
        [--seeds 1,2,3] [--threads 2] [--valid-size 0] [--precision auto] [--out results.jsonl]

The photos rows of the README (cifar10-6k: 5,000 training and 1,000 test photos):

    python3 benchmarks/bench_recipes.py --recipes accurate:chapter,photos:resnet \
        --datasets folder:../shared/data/cifar10-6k

and the ResNet's training speed, fp32 and bf16 (3 epochs each):

    python3 benchmarks/bench_recipes.py --recipes photos:resnet --datasets folder:../shared/data/cifar10-6k \
        --epochs 3 --precision fp32   (then --precision bf16)
"""

import argparse
import json
import statistics
import sys
import tempfile


def measure(recipe: str, source: str, seed: int, valid_size, precision: str = "auto", epochs=None) -> dict:
    import dataclasses

    from cnnkit.checkpoint import load_network
    from cnnkit.inference import evaluate
    from cnnkit.recipes import DATASET_DEFAULTS, RECIPES
    from cnnkit.runs import dataset_for_model, start_run

    name, _, network = recipe.partition(":")
    config = dataclasses.replace(RECIPES[name], seed=seed, precision=precision, keep=1)
    if network:
        config = dataclasses.replace(config, arch=network)
    if epochs:
        config = dataclasses.replace(config, epochs=epochs)
    with tempfile.TemporaryDirectory() as run_dir:
        result = start_run(
            source,
            config,
            run_dir,
            valid_size=valid_size,
            log=lambda line: None,
            show_progress=False,
            dataset_defaults=DATASET_DEFAULTS
            if not epochs
            else [n for n in DATASET_DEFAULTS if n != "epochs"],
        )
        model, ckpt = load_network(result.last_checkpoint)
        record = ckpt.record
        test = dataset_for_model(record, source, ckpt.path).test
        score = evaluate(model, record.standardization.apply(test.images), test.labels)
    history = record.history
    return {
        "recipe": recipe,
        "network": record.architecture.network,
        "precision": record.config.precision,
        "dataset": source,
        "seed": seed,
        "epochs": record.epoch,
        "augmentation": record.config.augment + (" + flip" if record.config.flip else ""),
        "test_accuracy": score.accuracy,
        "train_seconds": sum(epoch["epoch_seconds"] for epoch in history),
        "images_per_s": statistics.median(epoch["images_per_s"] for epoch in history),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="chapter,fast,accurate")
    parser.add_argument("--datasets", default="mnist-5k,fashion-mnist")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: cnnkit's choice)")
    parser.add_argument("--valid-size", default="0", help="validation images set aside (default: 0)")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto (default: auto)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="train this many epochs (default: the recipe's)"
    )
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args(argv)

    from cnnkit.threads import configure_threads

    threads = configure_threads(args.threads)
    import torch

    torch.set_num_threads(threads)
    from cnnkit.device import machine_line

    print(f"# machine: {machine_line()}", file=sys.stderr, flush=True)  # with every figure
    valid_size = float(args.valid_size) if "." in args.valid_size else int(args.valid_size)
    rows = []
    for source in args.datasets.split(","):
        for recipe in args.recipes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = measure(recipe, source, seed, valid_size, args.precision, args.epochs)
                rows.append(row)
                _emit(row, args.out)
            runs = [r for r in rows if r["recipe"] == recipe and r["dataset"] == source]
            _emit(
                {
                    "recipe": recipe,
                    "dataset": source,
                    "seeds": len(runs),
                    "median_test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
                    "median_train_seconds": statistics.median(r["train_seconds"] for r in runs),
                    "median_images_per_s": statistics.median(r["images_per_s"] for r in runs),
                },
                args.out,
            )


def _emit(row: dict, out):
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
