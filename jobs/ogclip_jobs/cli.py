"""The ``ogclip`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ogclip.config import ConfigError, load_yaml_config
from ogclip.settings import configure_logging, get_settings
from ogclip_jobs import submit
from ogclip_jobs.config import DemoConfig


def _models(args: argparse.Namespace) -> int:
    from ogclip.models import get_model_config, list_models  # torch-heavy; keep `ogclip --help` fast

    rows = []
    for name in list_models():
        cfg = get_model_config(name)
        text = cfg.text_cfg.get("hf_model_name") or f"open_clip text {cfg.text_cfg.get('layers', 12)} layers"
        rows.append({
            "name": name,
            "image_size": cfg.image_size,
            "vision_layers": cfg.vision_cfg.get("layers"),
            "vision_width": cfg.vision_cfg.get("width"),
            "patch_size": cfg.vision_cfg.get("patch_size"),
            "stem": cfg.stem,
            "embed_dim": cfg.embed_dim,
            "mrl": cfg.mrl.weighting,
            "text_tower": text,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = (f"{'name':<20}{'image':>6}{'layers':>8}{'width':>7}{'patch':>7}  {'stem':<6}{'embed':>5}  {'mrl':<9}"
              "text tower")
    print(header)
    for r in rows:
        print(f"{r['name']:<20}{r['image_size']:>6}{r['vision_layers']:>8}{r['vision_width']:>7}{r['patch_size']:>7}"
              f"  {r['stem']:<6}{r['embed_dim']:>5}  {r['mrl']:<9}{r['text_tower']}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type of ``--steps``: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _known_model(name: str, config: Path | None) -> None:
    """Refuse an unregistered architecture before Ray or the graph start."""
    from ogclip.models import list_models

    if name not in list_models():
        raise ConfigError(f"{config or 'the built-in defaults'}: unknown model {name!r}; registered: "
                          f"{', '.join(list_models())}")


# Each command reads and checks its config before importing its job (torch, Ray): a bad file is refused at once.

def _demo(args: argparse.Namespace) -> int:
    cfg = load_yaml_config(args.config, DemoConfig) if args.config else DemoConfig()
    updates: dict = {}
    if args.output_dir:
        updates["output_dir"] = args.output_dir
    if args.steps is not None:
        updates["train"] = cfg.train.model_copy(update={"train": cfg.train.train.model_copy(
            update={"steps": args.steps})})
    if args.no_ablation:
        updates["ablation"] = False
    _known_model(cfg.train.model, args.config)
    from ogclip_jobs.demo import run_demo

    run_demo(cfg.model_copy(update=updates))
    return 0


def _train(args: argparse.Namespace) -> int:
    from ogclip_jobs.config import TrainJobConfig

    cfg = load_yaml_config(args.config, TrainJobConfig) if args.config else TrainJobConfig()
    if args.steps is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": args.steps})})
    _known_model(cfg.model, args.config)
    from ogclip_jobs.train import run_training

    _, summary = run_training(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ogclip_jobs.config import AblationConfig, DenseConfig, EvalConfig, ProbeConfig, RetrievalConfig

    if args.eval_command and args.mask_modes:
        raise ValueError(f"--mask-modes is an option of `eval` itself, not of `eval {args.eval_command}`")
    if args.eval_command == "ablation":
        if not args.config:
            raise ValueError("`eval ablation` needs --config, e.g. infra/configs/ablation-cpu.yaml")
        ablation = load_yaml_config(args.config, AblationConfig)
        from ogclip_jobs.ablation import run_ablation

        run_ablation(ablation)
        return 0
    updates = {k: v for k, v in (("bundle", args.bundle), ("output_dir", args.output_dir)) if v}
    if args.eval_command == "probe":
        probe = load_yaml_config(args.config, ProbeConfig) if args.config else ProbeConfig()
        from ogclip_jobs.probe import run_probe

        run_probe(probe.model_copy(update=updates))
        return 0
    if args.eval_command == "dense":
        dense = load_yaml_config(args.config, DenseConfig) if args.config else DenseConfig()
        from ogclip_jobs.dense import run_dense

        run_dense(dense.model_copy(update=updates))
        return 0
    if args.eval_command == "retrieval":
        retrieval = load_yaml_config(args.config, RetrievalConfig) if args.config else RetrievalConfig()
        from ogclip_jobs.retrieval import run_retrieval

        run_retrieval(retrieval.model_copy(update=updates))
        return 0
    cfg = load_yaml_config(args.config, EvalConfig) if args.config else EvalConfig()
    if args.mask_modes:
        updates["mask_modes"] = EvalConfig.model_validate({"mask_modes": args.mask_modes.split(",")}).mask_modes
    from ogclip_jobs.evaluate import run_evaluation

    run_evaluation(cfg.model_copy(update=updates))
    return 0


def _index(args: argparse.Namespace) -> int:
    from ogclip_jobs.config import IndexBuildConfig

    cfg = load_yaml_config(args.config, IndexBuildConfig) if args.config else IndexBuildConfig()
    updates = {k: v for k, v in (("bundle", args.bundle), ("data", args.data), ("output_dir", args.output_dir)) if v}
    from ogclip_jobs.index import run_index_build

    print(json.dumps(run_index_build(cfg.model_copy(update=updates)), indent=2))
    return 0


def _kg(args: argparse.Namespace) -> int:
    from ogclip.settings import get_settings
    from ogclip_kg import server
    from ogclip_kg.store import GraphStore

    settings = get_settings()
    if args.kg_command in ("up", "down", "status"):
        if settings.neo4j_uri:
            print(f"OGCLIP_NEO4J_URI is set: the graph is the Neo4j server at {settings.neo4j_uri}, "
                  "not the embedded one", file=sys.stderr)
            return 2
        action = {"up": server.up, "down": server.down, "status": server.status}[args.kg_command]
        state = action(settings)
        print(json.dumps(state.as_dict()) if args.json else state.describe())
        return 0
    with GraphStore.from_settings(settings) as store:
        return _KG_COMMANDS[args.kg_command](store, args)


def _kg_seed(store, args: argparse.Namespace) -> int:
    from ogclip_kg.seeds import seed_graph

    summary = seed_graph(store, seed=args.seed, test_scale=args.test_scale)
    print(json.dumps(summary) if args.json else "seeded: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


def _parse_param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"--param expects name=value, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _kg_query(store, args: argparse.Namespace) -> int:
    from ogclip_kg.store import ReadOnlyViolation

    try:
        rows = store.analyst_query(args.cypher, dict(_parse_param(p) for p in args.param), limit=args.limit)
    except ReadOnlyViolation as exc:  # a refused query is bad input: exit status 2
        raise ValueError(str(exc)) from exc
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    columns = list(rows[0]) if rows else []
    print("\t".join(columns))
    for row in rows:
        print("\t".join(json.dumps(row[c], default=str) if not isinstance(row[c], str) else row[c] for c in columns))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", file=sys.stderr)
    return 0


def _kg_check(store, args: argparse.Namespace) -> int:
    from ogclip_kg.quality import check

    report = check(store)
    print(report.render(limit=args.limit))
    return 1 if report.errors else 0


def _kg_export(store, args: argparse.Namespace) -> int:
    print(f"wrote {store.export_jsonl(args.path)} lines to {args.path}")
    return 0


def _kg_import(store, args: argparse.Namespace) -> int:
    print(f"merged {store.import_jsonl(args.path)} nodes and relationships from {args.path}")
    return 0


def _kg_prompts(store, args: argparse.Namespace) -> int:
    from ogclip_kg import cypher
    from ogclip_kg.prompts import class_prompts, fetch_class_facts, vlm_prompt

    keys = list(args.keys) or [r["key"] for r in store.read(cypher.CLASS_SET_KEYS, key=args.class_set)]
    rows = fetch_class_facts(store, keys[: args.limit])
    out = []
    for row in rows:
        out.append({"key": row["key"], "prompts": class_prompts(row, seed=args.seed)})
        if args.vlm:
            out[-1]["vlm"] = vlm_prompt(row)
    print(json.dumps(out, indent=2))
    return 0


_KG_COMMANDS = {"seed": _kg_seed, "query": _kg_query, "check": _kg_check, "export": _kg_export,
                "import": _kg_import, "prompts": _kg_prompts}


def _data(args: argparse.Namespace) -> int:
    from ogclip_jobs.config import DataPipelineConfig, SynthSourceConfig
    from ogclip_jobs.data.pipeline import run_pipeline

    if args.data_command == "synth":
        source = SynthSourceConfig(class_set=args.classes, per_class=args.per_class, image_size=args.image_size,
                                   seed=args.seed, max_classes=args.max_classes)
        cfg = DataPipelineConfig(output_dir=args.output_dir, source=source)
        records = run_pipeline(cfg, only="ingest")
    else:
        cfg = load_yaml_config(args.config, DataPipelineConfig) if args.config else DataPipelineConfig()
        records = run_pipeline(cfg, only=args.stage)
    print(json.dumps(records, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    # The serving package runs in its own process: jobs and serve never import each other (their contract is the
    # bundle plus the class embeddings in the graph).
    import subprocess

    command = [sys.executable, "-m", "ogclip_serve.server", args.serve_command]
    if args.serve_command == "up" and args.config is not None:
        command += ["--config", str(args.config)]
    if getattr(args, "json", False):
        command.append("--json")
    return subprocess.call(command)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ogclip-platform")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ogclip", description="OG-CLIP zero-shot target recognition platform.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's own logs (driver, workers, Ray Data progress); the same as "
                             "OGCLIP_LOG_LEVEL=DEBUG. Without it they stay in Ray's session folder")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list the registered model architectures")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=_models)

    demo = commands.add_parser("demo", help="run the main job end to end on the embedded defaults")
    demo.add_argument("--config", type=Path, help="demo YAML (default: built-in defaults)")
    demo.add_argument("--steps", type=_positive_int, help="override the number of training steps (every model)")
    demo.add_argument("--output-dir", type=Path, help="where data, runs, reports and the bundle go")
    demo.add_argument("--no-ablation", action="store_true", help="skip training the ablation's other models")
    demo.set_defaults(func=_demo)

    train = commands.add_parser("train", help="train OG-CLIP with Ray Train, then export bundle + class embeddings")
    train.add_argument("--config", type=Path, help="training YAML, e.g. infra/configs/train-cpu.yaml")
    train.add_argument("--steps", type=_positive_int, help="override train.steps")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="zero-shot evaluation on the unseen classes; `eval ablation`, "
                                   "`eval probe`, `eval dense`, `eval retrieval`")
    evaluate.add_argument("eval_command", nargs="?", choices=["ablation", "probe", "dense", "retrieval"],
                          help="'ablation': train and score the building blocks; 'probe': attribute linear probes of "
                          "the bundle's image and text features; 'dense': a linear per-patch probe (segmentation "
                          "mIoU on multi-target scenes) beside the zero-shot mAcc; 'retrieval': image-text "
                          "Recall@1/5/10 and mR on captioned overhead scenes")
    evaluate.add_argument("--config", type=Path, help="EvalConfig YAML (AblationConfig for `eval ablation`, "
                          "ProbeConfig for `eval probe`, DenseConfig for `eval dense`, RetrievalConfig for "
                          "`eval retrieval`)")
    evaluate.add_argument("--bundle", type=Path, help="the bundle to evaluate (overrides the config)")
    evaluate.add_argument("--output-dir", type=Path, help="where the reports go (overrides the config)")
    evaluate.add_argument("--mask-modes", help="comma-separated ROI mask modes, e.g. exact,predicted,box "
                          "(overrides the config; `eval` only)")
    evaluate.set_defaults(func=_eval)
    index = commands.add_parser("index", help="retrieval collections for /v1/retrieve")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="embed shards' images and captions with a bundle (Ray Data)")
    build.add_argument("--config", type=Path, help="IndexBuildConfig YAML (default: built-in defaults)")
    build.add_argument("--bundle", type=Path, help="the bundle to embed with (overrides the config)")
    build.add_argument("--data", type=Path, help="the Parquet shards (overrides the config)")
    build.add_argument("--output-dir", type=Path, help="the collection folder (overrides the config)")
    build.set_defaults(func=_index)

    data = commands.add_parser("data", help="the curation pipeline on Ray Data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    data.set_defaults(func=_data)
    synth = data_commands.add_parser("synth", help="render the synthetic target world for a class set")
    synth.add_argument("--classes", choices=["train", "test"], default="train")
    synth.add_argument("--per-class", type=int, default=4)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--max-classes", type=int)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--output-dir", type=Path, default=Path("outputs/synth"))
    pipeline = data_commands.add_parser("pipeline", help="ingest → dedup → quality → masks → captions → shards")
    pipeline.add_argument("--config", type=Path, help="pipeline YAML (default: built-in defaults)")
    pipeline.add_argument("--stage", help="run only this stage (its input must exist)")

    kg = commands.add_parser("kg", help="the knowledge graph: embedded server, seed, queries, checks, prompts")
    kg_commands = kg.add_subparsers(dest="kg_command", required=True, metavar="KG_COMMAND")
    kg.set_defaults(func=_kg)
    for name, text in (("up", "start the embedded graph server (ArcadeDB over Bolt on 127.0.0.1)"),
                       ("down", "stop the embedded graph server"), ("status", "is the embedded graph server running")):
        kg_commands.add_parser(name, help=text).add_argument("--json", action="store_true",
                                                             help="print the server's state as JSON")
    seed = kg_commands.add_parser("seed", help="load the real seed data and define the train/test class sets")
    seed.add_argument("--seed", type=int, default=0, help="class-set selection seed")
    seed.add_argument("--test-scale", type=float, default=1.0, help="scale of the paper's 51/29/19 test split")
    seed.add_argument("--json", action="store_true")
    query = kg_commands.add_parser(
        "query", help="run a read-only Cypher query as the analyst account (writes and administration are refused; "
        "the server stops it after OGCLIP_KG_QUERY_TIMEOUT_S)")
    query.add_argument("cypher")
    query.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="query parameter (JSON)")
    query.add_argument("--limit", type=int, default=1000, help="print at most this many rows (read no more)")
    query.add_argument("--json", action="store_true", help="print JSON instead of tab-separated columns")
    check = kg_commands.add_parser("check", help="quality control: consistency checks and possible duplicates")
    check.add_argument("--limit", type=int, default=10, help="examples shown per finding")
    export = kg_commands.add_parser("export", help="write the graph as JSON lines")
    export.add_argument("path", type=Path)
    import_ = kg_commands.add_parser("import", help="merge a JSON-lines graph file into the graph")
    import_.add_argument("path", type=Path)
    prompts = kg_commands.add_parser("prompts", help="knowledge-infused prompts for classes")
    prompts.add_argument("keys", nargs="*", help="target keys (default: the class set)")
    prompts.add_argument("--class-set", default="test", choices=["train", "test"])
    prompts.add_argument("--limit", type=int, default=5)
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--vlm", action="store_true", help="also print the captioning (VLM) prompt")

    serve = commands.add_parser("serve", help="the classification service (Ray Serve): up, down, status")
    serve_commands = serve.add_subparsers(dest="serve_command", required=True, metavar="SERVE_COMMAND")
    serve.set_defaults(func=_serve)
    serve_up = serve_commands.add_parser("up", help="start the service locally and wait until it is ready")
    serve_up.add_argument("--config", type=Path, help="ServeConfig YAML, e.g. infra/serve/demo.yaml (default: "
                          "built-in defaults, serving the demo's bundle under ./outputs/demo)")
    serve_commands.add_parser("down", help="stop the service")
    serve_commands.add_parser("status", help="is the service running and ready").add_argument(
        "--json", action="store_true", help="print the service's state as JSON")

    submit.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # `submit`'s own options may follow the command it submits; put them first so argparse can tell them apart.
    args = build_parser().parse_args(submit.normalise_argv(sys.argv[1:] if argv is None else argv))
    if args.verbose:
        os.environ["OGCLIP_LOG_LEVEL"] = "DEBUG"
        get_settings.cache_clear()
    # Progress and diagnostics go to stderr through `logging`; stdout carries only a command's result.
    configure_logging()
    # Exit status as argparse has it: 2 for bad input (flags, config files, values), 1 for a failure while running.
    try:
        return args.func(args)
    except ValueError as exc:  # ConfigError, pydantic's ValidationError and other refused values
        print(f"ogclip {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (KeyError, OSError, RuntimeError) as exc:
        print(f"ogclip {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] + (" …" if len(text) > 500 else "")


if __name__ == "__main__":
    sys.exit(main())
