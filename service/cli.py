"""The ``ptserve`` command line: ``serve`` and ``worker`` (every flag is also a setting,
``PTSERVE_<NAME>`` in the environment), ``train``, ``eval``, ``import-peft``, ``export-peft`` and
``hash-key``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from prompts.errors import PtserveError, TaskNotFoundError
from prompts.jobs import Method, ProbeHead
from service.errors import SettingsError
from service.settings import Settings, default_frontends

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import httpx

    from prompts.artifact import PromptArtifact
    from prompts.backbone import Backbone
    from prompts.data import Example
    from prompts.metrics import Report
    from prompts.trainer import EpochStats, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TASK = "product_type"
DEMO_DATA = REPO_ROOT / "examples" / "product_type"
# The demo must be answering within a couple of CPU minutes on a fresh machine, whatever the load.
DEMO_MAX_SECONDS = 150.0

# (flag, setting, type, help): only flags given on the command line override the environment.
SERVE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "address to bind (PTSERVE_HOST)"),
    ("--port", "port", int, "port to bind (PTSERVE_PORT)"),
    ("--model", "model", str, "local Hugging Face model directory (PTSERVE_MODEL); default: packaged MiniLM"),
    ("--store", "store", str, "prompt store directory or redis:// URL (PTSERVE_STORE)"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N (PTSERVE_DEVICE)"),
    ("--dtype", "dtype", str, "float32, float16 or bfloat16 (PTSERVE_DTYPE)"),
    ("--max-batch-size", "max_batch_size", int, "rows per forward pass (PTSERVE_MAX_BATCH_SIZE)"),
    ("--max-batch-tokens", "max_batch_tokens", int, "padded tokens per forward (PTSERVE_MAX_BATCH_TOKENS)"),
    ("--max-wait-ms", "max_wait_ms", float, "how long a batch waits to fill (PTSERVE_MAX_WAIT_MS)"),
    ("--cache-bytes", "cache_bytes", int, "device prompt-cache budget (PTSERVE_CACHE_BYTES)"),
    ("--log-level", "log_level", str, "debug, info, warning or error (PTSERVE_LOG_LEVEL)"),
    ("--log-format", "log_format", str, "text or json (PTSERVE_LOG_FORMAT)"),
    ("--frontends", "frontends", int, "HTTP front-end processes before one engine (PTSERVE_FRONTENDS)"),
]

# The worker's flags: the backbone and store ones it shares with ``serve``, then its own.
WORKER_FLAGS: list[tuple[str, str, type, str]] = [
    *(f for f in SERVE_FLAGS if f[1] in ("model", "store", "device", "log_level", "log_format")),
    ("--jobs-url", "jobs_url", str, "job queue Redis URL (PTSERVE_JOBS_URL); default: a redis:// store"),
    ("--data-root", "data_root", Path, "server-side job data paths must lie in it (PTSERVE_DATA_ROOT)"),
    ("--name", "worker_name", str, "consumer name in the job queue (PTSERVE_WORKER_NAME); default: host-pid"),
    (
        "--claim-idle-s",
        "worker_claim_idle_s",
        float,
        "take over jobs whose worker is silent this long (PTSERVE_WORKER_CLAIM_IDLE_S)",
    ),
    ("--heartbeat-s", "worker_heartbeat_s", float, "heartbeat interval (PTSERVE_WORKER_HEARTBEAT_S)"),
    ("--max-attempts", "worker_max_attempts", int, "takes before a job fails (PTSERVE_WORKER_MAX_ATTEMPTS)"),
    ("--torch-threads", "torch_threads", int, "intra-op threads for training (PTSERVE_TORCH_THREADS)"),
]
SETTINGS_FLAGS = {"serve": SERVE_FLAGS, "worker": WORKER_FLAGS}


# The names prompts.jobs accepts (and prompts.methods.resolve_method maps), "auto" first.
METHOD_CHOICES: list[str] = list(get_args(Method))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _label_words(text: str) -> dict[str, list[str]]:
    """``label=word|word,label=word``, or a JSON file ``{"label": "word" or ["word", ...]}``."""
    path = Path(text)
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"cannot read label words from {path}: {exc}") from exc
        if not isinstance(value, dict) or not all(
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(w, str) for w in v))
            for v in value.values()
        ):
            raise argparse.ArgumentTypeError(f'{path}: expected {{"label": "word" or ["word", ...]}}')
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in value.items()}
    words: dict[str, list[str]] = {}
    for part in text.split(","):
        label, eq, spelled = part.partition("=")
        if not eq or not label.strip() or not spelled.strip():
            raise argparse.ArgumentTypeError(f"expected label=word|word,label=word; got {part!r}")
        words[label.strip()] = [w.strip() for w in spelled.split("|") if w.strip()]
    return words


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    for flag, dest, kind, text in SERVE_FLAGS:
        serve.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    serve.add_argument(
        "--demo",
        action="store_true",
        help=f"first train the demo task {DEMO_TASK!r} from examples/ into the store, unless it is there; "
        "without PTSERVE_API_KEYS (and PTSERVE_AUTH unset) the demo serves with auth off",
    )

    worker = commands.add_parser(
        "worker", help="train the jobs queued by POST /v1/training-jobs and publish them to the store"
    )
    for flag, dest, kind, text in WORKER_FLAGS:
        worker.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    hk = commands.add_parser(
        "hash-key", help="print an API key and its PTSERVE_API_KEYS entry ('<scope>[@<tenant>]:<sha256 hex>')"
    )
    hk.add_argument("--scope", choices=["classify", "admin"], default="classify")
    hk.add_argument("--tenant", help="bind the key to this tenant's tasks (default: a platform key)")
    hk.add_argument("--key", help="the key to hash (default: a new random key); read from stdin when '-'")

    keys = commands.add_parser(
        "keys", help="create, list or revoke stored API keys (every replica honours the change at once)"
    )
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key; it is printed this once")
    create.add_argument("--name", required=True, help="what the key is for (shown in listings)")
    create.add_argument("--scope", choices=["classify", "admin"], default="classify")
    create.add_argument("--tenant", help="the tenant whose tasks the key sees (default: a platform key)")
    create.add_argument("--rate", type=_positive_float, help="requests per second (token bucket)")
    create.add_argument("--burst", type=_positive_int, help="requests at once before the rate applies")
    keys_commands.add_parser("list", help="every stored key (never the keys themselves)")
    revoke = keys_commands.add_parser("revoke", help="revoke a key by its public id (k_...)")
    revoke.add_argument("key_id")
    for sub in (create, *keys_commands.choices.values()):
        if not any(a.dest == "store" for a in sub._actions):
            sub.add_argument("--store", help="the prompt store (default: PTSERVE_STORE or ./ptserve-data)")

    train = commands.add_parser("train", help="train a task's prompt on labelled data and publish it")
    train.add_argument("--task", required=True, help="task name ([a-z0-9][a-z0-9_.-]{0,63})")
    train.add_argument(
        "--data",
        required=True,
        type=Path,
        help="directory with train/dev/test .jsonl or .tsv files (and optional labels.json), or one "
        "train file (a stratified dev split is cut off)",
    )
    train.add_argument(
        "--method",
        choices=METHOD_CHOICES,
        default="auto",
        help="default: auto (P-tuning v2; below 100 train rows per label on sentence pairs, see README)",
    )
    _add_destination(train, upload=True)
    _add_backbone_flags(train)
    train.add_argument("--max-train-rows", type=_positive_int, help="cap the train set (stratified sample)")
    train.add_argument(
        "--epochs",
        type=_positive_int,
        help="maximum epochs (default per method: 30; probe with --probe-head trained 200); with "
        "--objective pairs, passes over the pairs (default 1)",
    )
    train.add_argument(
        "--objective",
        choices=["labels", "pairs"],
        help="what a prefix is trained on: labels (cross-entropy through the head, early stopping on "
        "dev) or pairs (SetFit's sentence pairs, then a fitted head: label prototypes, or (auto, 5 "
        "labels or more) logistic regression on standardised vectors; p-tuning-v2 only). "
        "Default: labels; auto chooses by the data's size (see README 'Few-shot data')",
    )
    train.add_argument(
        "--scales",
        action=argparse.BooleanOptionalAction,
        help="train (IA)^3 scales of every layer's keys, values and feed-forward activation beside the "
        "prompt (not with the probe). Default: off; auto turns them on below 100 train rows per label",
    )
    train.add_argument(
        "--lora-rank",
        type=int,
        help="train LoRA of this rank on every layer's attention and feed-forward projections beside the "
        "prompt (0: none; not with the probe). Default: none; auto trains it on few-shot data of at "
        "least 5 labels: rank 8 from 12 train rows per label, rank 16 from 24",
    )
    train.add_argument(
        "--probe-head",
        choices=list(get_args(ProbeHead)),
        help="how the linear probe's head is fitted (--method probe, and auto's probe candidate on "
        "few-shot data): standardized (logistic regression on standardised frozen vectors to convergence; "
        "the default of both) or trained (cross-entropy by epochs, early stopping on dev)",
    )
    train.add_argument(
        "--patience", type=_positive_int, help="epochs without a better dev accuracy before stopping"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=_positive_float, help="learning rate of the prompt (default per method)")
    train.add_argument("--head-lr", type=_positive_float, help="learning rate of the linear head")
    train.add_argument(
        "--prefix-length",
        "--prompt-length",
        dest="length",
        type=_positive_int,
        help="prefix length (prefix) or virtual tokens (ptuning, prompt); default 16, 32 for objective pairs",
    )
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--max-length", type=_positive_int, default=128, help="text tokens per example")
    train.add_argument("--reparam", action="store_true", help="prefix: MLP reparameterisation while training")
    train.add_argument(
        "--class-balanced", action="store_true", help="weight the loss by inverse label frequency"
    )
    train.add_argument(
        "--head",
        choices=["cls", "peft", "mean", "last", "verbalizer"],
        help="cls: the text's first token into the head; mean: mean of the text tokens; last: the text's "
        "last token; peft: the head of PEFT's sequence classifier, so the task exports to PEFT (BERT "
        "layout: position 0 through the pooler; decoders: the last token, no bias). Default: decoders "
        "last; encoders: mean for the probe, for p-tuning-v2 the pooling the backbone declares (mean for "
        "the packaged MiniLM, ModernBERT its classifier_pooling), else cls; verbalizer: label words "
        "predicted at a [MASK] after the prompt by the backbone's masked-LM head (ptuning or prompt; "
        "needs a checkpoint with one, e.g. BertForMaskedLM: the packaged MiniLM has none)",
    )
    train.add_argument(
        "--label-words",
        type=_label_words,
        help="head verbalizer: label=word|word,label=word or a JSON file {label: [words]}; each word one "
        "vocabulary token (default: the label itself)",
    )
    train.add_argument("--dev-fraction", type=float, default=0.1, help="dev split of a single data file")
    train.add_argument("--max-seconds", type=_positive_float, help="stop training after this many seconds")
    train.add_argument("--search", action="store_true", help="try every --search-lrs x --search-lengths pair")
    train.add_argument("--search-lrs", type=_float_list, default=[5e-3, 1e-2, 2e-2], help="comma-separated")
    train.add_argument("--search-lengths", type=_int_list, default=[8, 16, 32], help="comma-separated")
    _add_threads_flag(train)

    ev = commands.add_parser("eval", help="score a published task on labelled data")
    ev.add_argument("--task", required=True)
    ev.add_argument(
        "--data", required=True, type=Path, help="a .jsonl/.tsv file, or a data directory (test split)"
    )
    _add_destination(ev, upload=False)
    _add_backbone_flags(ev)
    ev.add_argument("--png", type=Path, help="save the confusion matrix as a PNG")
    ev.add_argument("--batch-size", type=_positive_int, default=64)
    _add_threads_flag(ev)

    imp = commands.add_parser("import-peft", help="turn a PEFT prompt-learning adapter into a task")
    imp.add_argument(
        "adapter", type=Path, help="directory with adapter_config.json + adapter_model.safetensors"
    )
    imp.add_argument("--task", required=True)
    imp.add_argument("--labels", help="comma-separated label names in classifier row order")
    _add_destination(imp, upload=True)
    _add_backbone_flags(imp)

    exp = commands.add_parser("export-peft", help="write a task as a PEFT adapter directory")
    exp.add_argument("--task", required=True)
    exp.add_argument("--out", required=True, type=Path, help="adapter directory to write")
    exp.add_argument("--store", help="prompt store directory (default: PTSERVE_STORE or ./ptserve-data)")
    exp.add_argument("--artifact", type=Path, help="read the task from this .safetensors file instead")
    exp.add_argument("--base-model", help="base_model_name_or_path to record in adapter_config.json")
    return parser


def _add_destination(parser: argparse.ArgumentParser, *, upload: bool) -> None:
    where = parser.add_mutually_exclusive_group()
    verb = "publish to" if upload else "read from"
    where.add_argument("--store", help=f"{verb} this prompt store (default: PTSERVE_STORE or ./ptserve-data)")
    where.add_argument("--server", help=f"{verb} a running service at this URL (e.g. http://127.0.0.1:8000)")
    if upload:
        where.add_argument("--out", type=Path, help="write the artifact to this .safetensors file")
    else:
        where.add_argument(
            "--artifact", type=Path, help="read the task from this .safetensors file (written by --out)"
        )


def _add_backbone_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="local Hugging Face model directory (default: PTSERVE_MODEL or packaged MiniLM)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--torch-threads",
        dest="torch_threads",
        type=_positive_int,
        help="intra-op threads (PTSERVE_TORCH_THREADS); default: torch's (all cores)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags = SETTINGS_FLAGS[args.command]
    overrides: dict[str, Any] = {
        dest: getattr(args, dest) for _, dest, _, _ in flags if getattr(args, dest) is not None
    }
    settings = Settings(**overrides)
    if getattr(args, "demo", False) and not settings.api_keys and "auth" not in settings.model_fields_set:
        # The README's one-command demo must answer without keys; an explicit PTSERVE_AUTH still wins.
        settings = settings.model_copy(update={"auth": "off"})
    return settings


def _setting_errors(exc: ValidationError) -> str:
    flags = {dest: flag for flag, dest, _, _ in (*SERVE_FLAGS, *WORKER_FLAGS)}
    lines = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        if not name:  # a check across several settings; its message names them
            lines.append(f"  {message}")
            continue
        where = f"{flags[name]} / " if name in flags else ""
        got = f" (got {err['input']!r})" if isinstance(err.get("input"), str | int | float) else ""
        lines.append(f"  {name} ({where}PTSERVE_{name.upper()}): {message}{got}")
    return "\n".join(lines)


def with_frontends(settings: Settings) -> Settings:
    """``settings`` with ``frontends`` decided: as set, else by the device (settings.default_frontends)."""
    if settings.frontends is not None:
        frontends = settings.frontends
    else:
        from prompts.backbone import resolve_device

        try:
            cuda = resolve_device(settings.device).type == "cuda"
        except PtserveError:  # a bad device: loading the backbone reports it
            cuda = False
        frontends = default_frontends(cuda, os.cpu_count() or 1)
        logger.info("front ends: %d (default for %s)", frontends, "CUDA" if cuda else "a CPU")
    return settings.model_copy(update={"frontends": frontends})


def serve(settings: Settings, backbone: Backbone | None = None) -> None:
    import uvicorn

    from service.app import create_app
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    settings = with_frontends(settings)
    assert settings.frontends is not None
    if settings.frontends > 1:
        from service.auth import KeyRing
        from service.frontends.supervisor import Supervisor

        KeyRing.from_settings(settings)  # auth on without keys stops start-up here, as below
        raise SystemExit(Supervisor(settings).run())
    # Built before uvicorn starts, so invalid settings (auth on without keys) stop start-up here.
    app = create_app(settings, backbone=backbone, freeze_gc=True)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep configure_logging's handlers and format
        # h11 even where httptools is installed: uvicorn bounds a request's head at 16 KiB only with
        # h11; with httptools a client could make it buffer headers without limit. Parsing was ~6% of
        # a single-text request's CPU in the profile, and h11 measured the same rate as httptools.
        http="h11",
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s),
    )


class CliError(PtserveError):
    """A command that cannot go on; the message is printed as is."""

    code = "cli_error"


# ------------------------------------------------------------------------------------------ helpers


def default_store() -> str:
    """The store ``serve`` would use: PTSERVE_STORE, else the settings default."""
    default = Settings.model_fields["store"].default
    return os.environ.get("PTSERVE_STORE") or str(default)


def torch_threads(args: argparse.Namespace) -> int | None:
    """``--torch-threads``, else PTSERVE_TORCH_THREADS (as ``serve`` and ``worker`` read it), else None."""
    if args.torch_threads is not None:
        threads: int = args.torch_threads
        return threads
    raw = os.environ.get("PTSERVE_TORCH_THREADS", "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise CliError(f"PTSERVE_TORCH_THREADS must be a positive integer, got {raw!r}")
    return value


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _load_backbone(model: str | None, device: str) -> Backbone:
    from prompts.backbone import load_backbone

    path = model or os.environ.get("PTSERVE_MODEL") or None
    # Training and evaluation run in float32: gradients in half precision lose the small prompt updates.
    return load_backbone(path, device=device, dtype="float32")


def make_http_client() -> httpx.Client:
    """The HTTP client ``--server`` commands use (tests swap in the app's TestClient)."""
    import httpx

    return httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0))


def _server_error(response: httpx.Response, what: str) -> CliError:
    try:
        error = response.json()["error"]
        detail = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        detail = response.text[:500]
    return CliError(f"{what} failed with HTTP {response.status_code}: {detail}")


def upload_artifact(server: str, data: bytes, *, client: httpx.Client | None = None) -> dict[str, Any]:
    """POST an artifact to ``{server}/v1/prompts`` (multipart field ``file``); returns the 201 body."""
    import httpx

    owned = client is None
    http = client if client is not None else make_http_client()
    url = f"{server.rstrip('/')}/v1/prompts"
    try:
        response = http.post(url, files={"file": ("artifact.safetensors", data, "application/octet-stream")})
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {url}: {exc}") from exc
    finally:
        if owned:
            http.close()
    if response.status_code != 201:
        raise _server_error(response, f"upload to {url}")
    body: dict[str, Any] = response.json()
    return body


def publish(artifact: PromptArtifact, *, store: str | None, server: str | None, out: Path | None) -> str:
    """Write the artifact where the flags say (default: the default store); returns where, for the user."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        artifact.save(out)
        return str(out)
    if server is not None:
        with make_http_client() as client:
            body = upload_artifact(server, artifact.data, client=client)
        return f"{server} (version {body.get('version')})"
    from service.runtime import open_store

    path = store or default_store()
    target = open_store(path)
    try:
        target.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())
    finally:
        target.close()
    return f"store {path}"


class TqdmProgress:
    """A tqdm bar over optimiser steps with the running loss, and one line per epoch."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None
        self.loss_sum = 0.0
        self.loss_count = 0
        self.dev = float("nan")

    def start(self, total_steps: int, epochs: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps, desc=self.description, unit="step", dynamic_ncols=True, file=sys.stderr
        )

    def step(self, loss: float) -> None:
        self.loss_sum += loss
        self.loss_count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{self.loss_sum / self.loss_count:.4f}", dev_acc=f"{self.dev:.4f}", refresh=False
            )

    def epoch(self, stats: EpochStats) -> None:
        self.dev = stats.dev_accuracy
        self.loss_sum, self.loss_count = 0.0, 0
        if self.bar is not None:
            mark = "  (best)" if stats.best else ""
            self.bar.write(
                f"epoch {stats.epoch:3d}  loss {stats.train_loss:.4f}  "
                f"dev accuracy {stats.dev_accuracy:.4f}  macro-F1 {stats.dev_macro_f1:.4f}  "
                f"{stats.seconds:6.1f}s{mark}",
                file=sys.stderr,
            )
            self.bar.set_postfix(loss=f"{stats.train_loss:.4f}", dev_acc=f"{stats.dev_accuracy:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from prompts.training import make_train_config

    return make_train_config(
        args.method,
        length=args.length,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        lr=args.lr,
        head_lr=args.head_lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        reparam=args.reparam,
        class_balanced=args.class_balanced,
        head=args.head,
        max_seconds=args.max_seconds,
        label_words=args.label_words,
        objective=args.objective,
        scales=args.scales,
        lora_rank=args.lora_rank,
        probe_head=args.probe_head,
    )


def train_command(args: argparse.Namespace, backbone: Backbone | None = None) -> int:
    from prompts.data import load_task_data
    from prompts.names import validate_task_name

    validate_task_name(args.task)
    threads = torch_threads(args)
    # The data is read and checked before torch is even imported: a bad path or label is reported in
    # well under a second, not after the seconds that torch, transformers and the backbone take.
    data = load_task_data(
        args.data, dev_fraction=args.dev_fraction, seed=args.seed, max_train_rows=args.max_train_rows
    )
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"data: {len(data.train)} train, {len(data.dev)} dev, {len(data.test)} test rows, "
        f"{len(data.labels)} labels",
        file=sys.stderr,
    )
    from prompts.training import SearchGrid, run_training

    config = _train_config(args)
    _set_threads(threads)
    backbone = backbone or _load_backbone(args.model, args.device)
    grid = SearchGrid(args.search_lrs, args.search_lengths) if args.search else None

    def progress(c: TrainConfig) -> TqdmProgress:
        return TqdmProgress(f"{args.task} lr={c.lr} P={c.prefix_length}" if args.search else args.task)

    result = run_training(backbone, args.task, data, config, progress_factory=progress, grid=grid)
    for trial in result.trials:
        print(f"search: {json.dumps(trial)}", file=sys.stderr)
    where = publish(result.artifact, store=args.store, server=args.server, out=args.out)
    m = result.artifact.manifest
    print(f"task {m.task} version {m.version} ({m.method}) -> {where}")
    if result.config.plan is not None:
        plan = result.config.plan
        print(f"method auto: {plan['regime']}: {plan['reason']}")
        if "kept" in plan:
            dev = {name: f"{c['dev_accuracy']:.4f}" for name, c in plan["candidates"].items()}
            print(
                f"kept {plan['kept']}: dev accuracy {dev}, McNemar z {plan['mcnemar_z']} "
                f"(the probe is kept from {plan['probe_z']})"
            )
    print(
        f"dev accuracy {result.dev.accuracy:.4f}  macro-F1 {result.dev.macro_f1:.4f}"
        f"  (best epoch {result.best_epoch} of {result.epochs_run}, {result.seconds:.1f}s, "
        f"{result.trainable_parameters} trainable parameters)"
    )
    if result.test is not None:
        print(f"test accuracy {result.test.accuracy:.4f}  macro-F1 {result.test.macro_f1:.4f}")
    return 0


def _eval_examples(path: Path) -> list[Example]:
    from prompts.data import DataError, find_split_file, read_examples

    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        found = find_split_file(path, "test") or find_split_file(path, "dev")
        if found is None:
            raise DataError(
                f"{path}: no test or dev file (test.jsonl, test.tsv, dev.jsonl, dev.tsv) to evaluate on"
            )
        path = found
    return read_examples(path)


def _read_artifact(args: argparse.Namespace) -> PromptArtifact:
    """The task's artifact from ``--artifact FILE`` or the prompt store."""
    from prompts.artifact import parse_artifact
    from service.runtime import open_store

    if args.artifact is not None:
        try:
            data = args.artifact.read_bytes()
        except FileNotFoundError:
            raise CliError(f"{args.artifact}: no such artifact file") from None
        except OSError as exc:
            raise CliError(f"{args.artifact}: cannot read: {exc.strerror or exc}") from exc
        artifact = parse_artifact(data)
        if artifact.task != args.task:
            raise CliError(f"{args.artifact} holds task {artifact.task!r}, not {args.task!r}")
        return artifact
    store = open_store(args.store or default_store())
    try:
        stored = store.get(args.task)
    finally:
        store.close()
    return parse_artifact(stored.data)


def _predict_local(
    artifact: PromptArtifact, args: argparse.Namespace, texts: list[str], backbone: Backbone | None
) -> list[str]:
    """The predicted label per text, running the artifact through prompted_forward here."""
    from prompts.artifact import check_compatible, max_text_tokens
    from prompts.forward import TaskPrompt
    from prompts.trainer import predict

    backbone = backbone or _load_backbone(args.model, args.device)
    check_compatible(artifact, backbone.spec)
    task = TaskPrompt.from_artifact(artifact, backbone.device, backbone.dtype)
    # Cut texts exactly as the service does for this task.
    room = max_text_tokens(artifact.manifest, backbone.spec)
    ids = [e.input_ids for e in backbone.encode(texts, room)]
    logits = predict(backbone, task, ids, args.batch_size)
    labels = artifact.manifest.labels
    return [labels[i] for i in logits.argmax(-1).tolist()]


def classify_remote(
    server: str, task: str, texts: list[str], *, batch_size: int = 64, client: httpx.Client | None = None
) -> tuple[list[str], list[str]]:
    """(labels, predicted label per text) from a running service: GET the task, POST /v1/classify."""
    import httpx

    owned = client is None
    http = client if client is not None else make_http_client()
    base = server.rstrip("/")
    try:
        info = http.get(f"{base}/v1/prompts/{task}")
        if info.status_code != 200:
            raise _server_error(info, f"reading task {task!r} from {base}")
        labels = [str(x) for x in info.json()["labels"]]
        predicted = [""] * len(texts)
        # Requests of similar lengths (characters: the client has no tokenizer) pad less in the
        # service's batches; answers go back to the texts' own order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            chunk = [texts[i] for i in idx]
            response = http.post(f"{base}/v1/classify", json={"task": task, "texts": chunk})
            if response.status_code != 200:
                raise _server_error(response, f"classify on {base}")
            for i, result in zip(idx, response.json()["results"], strict=True):
                predicted[i] = str(result["label"])
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {base}: {exc}") from exc
    finally:
        if owned:
            http.close()
    return labels, predicted


def eval_command(args: argparse.Namespace, backbone: Backbone | None = None) -> Report:
    from prompts.data import check_labels
    from prompts.metrics import evaluate, format_confusion, format_report, save_confusion_png
    from prompts.names import validate_task_name

    validate_task_name(args.task)
    threads = torch_threads(args)
    examples = _eval_examples(args.data)
    texts = [e.text for e in examples]
    where = f"{args.data} (checked against task {args.task!r})"
    if args.server is not None:
        with make_http_client() as client:
            labels, predicted = classify_remote(
                args.server, args.task, texts, batch_size=args.batch_size, client=client
            )
        check_labels(examples, labels, where)
    else:
        artifact = _read_artifact(args)
        labels = artifact.manifest.labels
        # Before the backbone loads: a label mismatch is reported without waiting for the model.
        check_labels(examples, labels, where)
        _set_threads(threads)
        predicted = _predict_local(artifact, args, texts, backbone)
    index = {label: i for i, label in enumerate(labels)}
    report = evaluate([index[e.label] for e in examples], [index[p] for p in predicted], labels)
    print(f"task {args.task} on {args.data}")
    print(format_report(report))
    print()
    print("confusion matrix (rows: true label, columns: predicted label)")
    print(format_confusion(report))
    if args.png is not None:
        save_confusion_png(report, args.png, title=f"{args.task} on {args.data.name}")
        print(f"confusion matrix saved to {args.png}")
    return report


def import_peft_command(args: argparse.Namespace, backbone: Backbone | None = None) -> int:
    from prompts.peft_io import import_peft_adapter

    backbone = backbone or _load_backbone(args.model, args.device)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    artifact = import_peft_adapter(args.adapter, task=args.task, spec=backbone.spec, labels=labels)
    where = publish(artifact, store=args.store, server=args.server, out=args.out)
    print(f"task {artifact.task} version {artifact.version} ({artifact.manifest.method}) -> {where}")
    return 0


def export_peft_command(args: argparse.Namespace) -> int:
    from prompts.artifact import parse_artifact
    from prompts.peft_io import export_peft_adapter
    from service.runtime import open_store

    if args.artifact is not None:
        artifact = parse_artifact(args.artifact.read_bytes())
    else:
        store = open_store(args.store or default_store())
        try:
            artifact = parse_artifact(store.get(args.task).data)
        finally:
            store.close()
    if artifact.task != args.task:
        raise CliError(f"{args.artifact} holds task {artifact.task!r}, not {args.task!r}")
    out = export_peft_adapter(artifact, args.out, base_model_name_or_path=args.base_model)
    print(f"task {artifact.task} version {artifact.version} -> PEFT adapter {out}")
    return 0


def ensure_demo_task(settings: Settings, backbone: Backbone, data: Path | None = None) -> bool:
    """Train the demo task into the settings' store unless a servable version is there; True if trained."""
    data = data if data is not None else DEMO_DATA
    from prompts.data import load_task_data
    from prompts.trainer import TrainConfig, train_task
    from service.runtime import open_store

    store = open_store(settings.store, settings.keep_versions, settings.write_replicas)
    try:
        try:
            record = store.record(DEMO_TASK)
        except TaskNotFoundError:
            record = None
        fingerprint = (record.manifest.get("backbone") or {}).get("fingerprint") if record else None
        if fingerprint == backbone.spec.fingerprint:
            return False
        if record is not None:
            print(
                f"demo: stored {DEMO_TASK!r} was trained on another backbone; training it again",
                file=sys.stderr,
            )
        if not data.is_dir():
            raise CliError(f"demo data {data} is missing; run from a checkout of the repository")
        task_data = load_task_data(data)
        config = TrainConfig(method="p-tuning-v2", max_seconds=DEMO_MAX_SECONDS)
        print(f"demo: training {DEMO_TASK!r} on {len(task_data.train)} examples from {data}", file=sys.stderr)
        result = train_task(backbone, DEMO_TASK, task_data, config, progress=TqdmProgress(DEMO_TASK))
        artifact = result.artifact
        store.put(artifact.task, artifact.version, artifact.data, artifact.manifest_json())
        test = f", test accuracy {result.test.accuracy:.3f}" if result.test is not None else ""
        print(
            f"demo: {DEMO_TASK!r} version {artifact.version} stored in {settings.store} "
            f"(dev accuracy {result.dev.accuracy:.3f}{test}, {result.seconds:.0f}s)",
            file=sys.stderr,
        )
        return True
    finally:
        store.close()


def hash_key_command(args: argparse.Namespace) -> int:
    from prompts.names import validate_tenant
    from service.auth import hash_key, new_key

    key = args.key
    if key == "-":
        key = sys.stdin.readline().strip()
    if key is not None and not key:
        raise CliError("the key is empty")
    shown = key is None
    key = key or new_key()
    if shown:
        print(f"key:   {key}")
    tenant = f"@{validate_tenant(args.tenant)}" if args.tenant else ""
    print(f"entry: {args.scope}{tenant}:{hash_key(key)}")
    if shown:
        print(
            "Give the key to the client; put the entry in PTSERVE_API_KEYS (comma-separated).",
            file=sys.stderr,
        )
    return 0


def keys_command(args: argparse.Namespace) -> int:
    """``ptserve keys``: works on the store itself, as a platform admin acting from the command line."""
    from service.runtime import open_store, open_tenancy
    from service.tenancy import Principal

    store = open_store(args.store or default_store())
    try:
        tenancy = open_tenancy(Settings(), store)
        if tenancy.keys is None:
            raise CliError(f"the prompt store {args.store or default_store()} keeps no API keys")
        actor = Principal(key_id="cli", scope="admin")
        if args.keys_command == "create":
            from prompts.names import validate_tenant

            if args.tenant is not None:
                validate_tenant(args.tenant)
            key, record = tenancy.keys.create(
                name=args.name,
                scope=args.scope,
                tenant=args.tenant,
                created_by=actor.key_id,
                rate_per_s=args.rate,
                burst=args.burst,
            )
            if tenancy.audit is not None:
                detail = {"key": record.id, "scope": record.scope, "name": record.name}
                tenancy.audit.record(actor, "key.create", tenant=record.tenant, detail=detail)
            print(f"key: {key}")
            print(f"id:  {record.id}  scope {record.scope}  tenant {record.tenant or '(platform)'}")
            print("Give the key to its user: it is not stored and cannot be shown again.", file=sys.stderr)
        elif args.keys_command == "list":
            for r in tenancy.keys.records():
                state = f"revoked {r.revoked_at}" if r.revoked_at else "active"
                limits = f" rate {r.rate_per_s:g}/s burst {r.burst}" if r.rate_per_s else ""
                print(f"{r.id}  {r.scope:8}  {(r.tenant or '(platform)'):20}  {state:32}  {r.name}{limits}")
        else:
            record = tenancy.keys.revoke(args.key_id)
            if tenancy.audit is not None:
                detail = {"key": record.id, "scope": record.scope, "name": record.name}
                tenancy.audit.record(actor, "key.revoke", tenant=record.tenant, detail=detail)
            print(f"revoked {record.id} ({record.name}) at {record.revoked_at}")
        return 0
    finally:
        store.close()


def serve_command(settings: Settings, demo: bool) -> None:
    from service.auth import KeyRing

    # Refuse auth on without keys before spending minutes on the demo's training.
    KeyRing.from_settings(settings)
    backbone = None
    if demo:
        from prompts.backbone import load_backbone

        trainer_backbone = load_backbone(settings.model, device=settings.device, dtype="float32")
        ensure_demo_task(settings, trainer_backbone)
        # Reuse the loaded backbone when it is what the service would load anyway.
        backbone = trainer_backbone if settings.dtype == "float32" else None
    serve(settings, backbone)


def worker_command(settings: Settings) -> None:
    from service.logs import configure_logging
    from service.worker import run_worker

    configure_logging(settings.log_level, settings.log_format)
    run_worker(settings)


COMMANDS: dict[str, Callable[[argparse.Namespace], object]] = {
    "train": train_command,
    "eval": eval_command,
    "import-peft": import_peft_command,
    "export-peft": export_peft_command,
    "hash-key": hash_key_command,
    "keys": keys_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in SETTINGS_FLAGS:
        # Long-running commands report progress through logging too (backbone load, early stop).
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            COMMANDS[args.command](args)
        except PtserveError as exc:
            print(f"ptserve {args.command}: error: {exc.message}", file=sys.stderr)
            return 1
        return 0
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"ptserve: invalid settings:\n{_setting_errors(exc)}", file=sys.stderr)
        return 2
    try:
        if args.command == "worker":
            worker_command(settings)
        else:
            serve_command(settings, args.demo)
    except SettingsError as exc:
        print(f"ptserve: invalid settings:\n  {exc.message}", file=sys.stderr)
        return 2
    except PtserveError as exc:
        print(f"ptserve {args.command}: error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
