"""The ``verify`` subcommand (registered through the ``somp_ref.commands`` entry points)."""

from __future__ import annotations

import argparse
import json

from somp_ref.cli_options import add_json, add_model, add_model_placement


def _format(rows: list[dict]) -> str:
    width = max(len(r["name"]) for r in rows) + 2
    lines = [f"{'check':<{width}}{'error':>10}  {'tolerance':>9}  status"]
    for r in rows:
        error = "-" if r["error"] is None else f"{r['error']:.2e}"
        tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.0e}"
        note = f"  ({r['detail']})" if r["detail"] and r["status"] != "pass" else ""
        lines.append(f"{r['name']:<{width}}{error:>10}  {tol:>9}  {r['status']}{note}")
    return "\n".join(lines)


def _run_verify(args: argparse.Namespace) -> int:
    if args.port:
        from somp_ref.verify.ports import check_port

        reports = check_port(args.port)
        rows = [
            {
                "name": r.case,
                "error": None,
                "tolerance": None,
                "status": "pass" if r.passed else "FAIL",
                "detail": r.detail,
            }
            for r in reports
        ]
    else:
        from somp_ref.verify.checks import all_checks

        if args.model not in ("none", "default"):
            from somp_ref.adapters.models import local_checkpoint

            local_checkpoint(args.model)  # a mistyped path fails now, not after the checks
        loading = {}
        if args.model != "none":
            from somp_ref.adapters.preflight import check_device, check_device_map, read_device_map

            check_device_map(args)
            check_device(args.device)
            loading = {
                "revision": args.revision,
                "device": args.device,
                "dtype": args.dtype,
                "attn_implementation": args.attn_implementation,
                "device_map": read_device_map(args.device_map),
                "offload_folder": args.offload_folder,
            }
        model = None if args.model == "none" else args.model
        rows = [c.as_dict() for c in all_checks(model, loading)]
    failed = [r["name"] for r in rows if r["status"] == "FAIL"]
    if args.json:
        print(json.dumps({"checks": rows, "failed": failed}, indent=1))
    else:
        print(_format(rows))
        print(
            f"\n{len(rows) - len(failed)} passed or skipped, {len(failed)} failed"
            + (f": {', '.join(failed)}" if failed else "")
        )
    return 1 if failed else 0


def register(subparsers) -> None:
    """Add ``verify`` to the ``somp-ref`` command."""
    parser = subparsers.add_parser(
        "verify",
        help="numerical agreement checks, or check a port against the golden vectors",
        description=(
            "Run every agreement check (naive vs fast engine, factored vs materialised "
            "pursuit, scikit-learn's OMP and SPAMS when installed, Logit Lens vs MP, the "
            "torch port in float64/float32 and on CUDA when present, model internals, store "
            "round trip, golden vectors) and print measured error, tolerance and status, "
            "as a table or, with --json, as JSON on stdout (writes no file). With --port, "
            "run an implementation against the golden vectors instead. Exit status 1 on any "
            "failed check, 2 on bad arguments (an unknown port or model)."
        ),
        epilog="a port is called as port(H, D, n_atoms, *, center, normalize, criterion, "
        "tol) and returns support, coef, explained_variance (attributes or keys). "
        "examples: somp-ref verify --model none; "
        "somp-ref verify --port somp_ref.adapters.torch_somp:somp_torch",
    )
    parser.add_argument(
        "--port",
        metavar="MODULE:FUNCTION",
        help="check this implementation against the golden vectors instead "
        "(default: run the agreement checks)",
    )
    add_model(
        parser,
        "model for the internals checks (loaded as --device, --dtype, --device-map say): "
        "'default' (the embedded SmolLM2), a local checkpoint, a hub id, or 'none' to skip "
        "them (default: default)",
    )
    add_model_placement(parser)
    add_json(parser)
    parser.set_defaults(func=_run_verify)
