"""The selection certificate of each user personalised from an adapter zoo.

Example:
    python eval/zoo_bound.py --selection runs/zoo_dev/selection.json \
        --output_file runs/zoo_dev/bound.json [--golds_json dev_outputs.json \
        --preds_json runs/zoo_eval/predictions.json]

Choosing one of N fixed adapters by any rule that looks at m support examples, the query
error of the chosen one is at most its support error + sqrt(ln(N / delta) / (2 m)) with
probability 1 - delta (Hoeffding and a union bound over the N; the query drawn like the
support). The loss is 1 - the task's per-example selection metric: 0/1 error for
classification, 1 - ROUGE-1 for generation, the normalised absolute error for LaMP-3.
With golds and predictions, each user's query loss is reported beside the bound (users of
the user split have one question: the question id is the user).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

if importlib.util.find_spec("LaMP") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import atomic_write_json, check_outputs, read_json
from LaMP.utils.errors import LampError

logger = logging.getLogger(__name__)

DELTA = 0.05  # the failure probability of the certificate (the fork's)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selection", required=True,
                        help="selection.json of a personalize_from_zoo.py --output_dir")
    parser.add_argument("--output_file", required=True, help="where to write the bounds JSON")
    parser.add_argument("--delta", type=float, default=DELTA,
                        help=f"failure probability of the bound (default {DELTA})")
    parser.add_argument("--golds_json", default=None,
                        help="gold outputs of the users' questions (with --preds_json: each "
                             "user's query loss beside the bound)")
    parser.add_argument("--preds_json", default=None,
                        help="predictions of evaluate_llm.py --user_adapters on those questions")
    args = parser.parse_args(argv)
    if not 0 < args.delta < 1:
        parser.error(f"--delta must be in (0, 1), not {args.delta}")
    if (args.golds_json is None) != (args.preds_json is None):
        parser.error("--golds_json and --preds_json go together")
    return args


def user_bounds(selection: dict, delta: float, source: str) -> dict[str, dict]:
    from LaMP.utils.evaluation.bounds import selection_bound

    users = selection.get("users")
    if not isinstance(users, dict) or not users:
        raise LampError(f"{source}: no \"users\" object (not a personalize_from_zoo.py "
                        "selection.json)")
    bounds = {}
    for user, record in users.items():
        if isinstance(record, dict) and record.get("method") in ("lorahub", "pieces"):
            raise LampError(f"{source}: user {user!r} was personalized by "
                            f"{record['method']}, a combination fitted to the user's data "
                            "rather than a choice among N fixed adapters: the certificate "
                            "does not cover it")
        try:
            error, n, m = (float(record["support_error"]), int(record["candidates"]),
                           int(record["support_size"]))
        except (KeyError, TypeError, ValueError):
            raise LampError(f"{source}: user {user!r} lacks support_error, candidates or "
                            "support_size") from None
        bound = selection_bound(error, n, m, delta)
        bounds[user] = {"support_error": error, "candidates": n, "support_size": m,
                        "epsilon": bound - error, "bound": bound}
    return bounds


def add_query_losses(bounds: dict[str, dict], task_name: str, golds_path: str,
                     preds_path: str) -> None:
    from LaMP.utils.data.outputs import load_outputs
    from LaMP.utils.evaluation.scoring import paired_outputs, utilities
    from LaMP.utils.tasks import get_task

    golds = load_outputs(golds_path, what="gold file")
    preds = load_outputs(preds_path, what="predictions file")
    task, ids, gold, pred = paired_outputs(golds, preds, get_task(task_name))
    losses = dict(zip(ids, (1.0 - u for u in utilities(task, ids, gold, pred, preds_path))))
    missing = [user for user in bounds if user not in losses]
    if missing:
        raise LampError(f"{golds_path}: no question with id {missing[0]!r} (the user split's "
                        "questions are their own users)")
    for user, entry in bounds.items():
        entry["query_loss"] = losses[user]


def summary(bounds: dict[str, dict]) -> dict:
    n = len(bounds)
    result = {"users": n, **{f"mean_{key}": sum(b[key] for b in bounds.values()) / n
                             for key in ("support_error", "bound")}}
    if all("query_loss" in b for b in bounds.values()):
        result["mean_query_loss"] = sum(b["query_loss"] for b in bounds.values()) / n
        result["share_within_bound"] = sum(b["query_loss"] <= b["bound"]
                                           for b in bounds.values()) / n
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_outputs(files={"--output_file": args.output_file},
                  inputs={"--selection": args.selection, "--golds_json": args.golds_json,
                          "--preds_json": args.preds_json})
    selection = read_json(args.selection, "selection file")
    if not isinstance(selection, dict):
        raise LampError(f"{args.selection}: not a JSON object")
    bounds = user_bounds(selection, args.delta, args.selection)
    if args.golds_json:
        add_query_losses(bounds, str(selection.get("task")), args.golds_json, args.preds_json)
    result = {"delta": args.delta, "summary": summary(bounds), "users": bounds}
    atomic_write_json(args.output_file, result, indent=1)
    logger.info("wrote %s", args.output_file)
    return result


if __name__ == "__main__":
    sys.exit(run(main))
