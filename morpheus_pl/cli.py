"""Command-line interface: LightningCLI with the argument links of the project."""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# Imported so that --help lists the project's models and DataModules.
import data_modules.datamodule  # noqa: F401
import morpheus_pl.pretraining  # noqa: F401
import morpheus_pl.tasks  # noqa: F401
from morpheus_pl.callbacks import RunCheckpoint
from morpheus_pl.convert import COMMANDS as CONVERTERS
from morpheus_pl.convert import main as run_converter
from morpheus_pl.errors import InputError
from morpheus_pl.prediction import ReconstructionWriter
from morpheus_pl.reconstruction import SLIDE, resolve_request
from morpheus_pl.protocols import PROTOCOLS
from morpheus_pl.protocols import main as run_protocol
from morpheus_pl.report import main as run_report


CKPT_PATH_HELP = (
    "Checkpoint file to resume (fit) or to evaluate (validate, test, predict), or 'last': the "
    "newest last.ckpt among the versions of the configured logger (the version of a --config "
    "saved in a version folder). fit then continues in that version, or starts from scratch "
    "when there is none; the other commands stop with an error."
)


class MorpheusCLI(LightningCLI):
    """LightningCLI whose models receive data-derived sizes through links.

    ``data.feature_dim`` becomes ``model.init_args.patch_dim`` and
    ``data.modality_specs`` becomes ``model.init_args.modalities`` once the DataModule
    is built, so configs never repeat sizes that the data determine. A
    ``ModelCheckpoint`` (with ``last.ckpt``) is always configured under ``checkpoint``,
    and ``predict`` always writes its outputs with a ``ReconstructionWriter`` configured
    under ``prediction``.
    """

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # Remember which subcommand is being built: only predict gets the writer options.
        self._building = subcommand
        try:
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        finally:
            self._building = None
        for action in parser._actions:
            if "--ckpt_path" in action.option_strings:
                action.help = CKPT_PATH_HELP
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if getattr(self, "_building", None) == "predict":
            parser.add_lightning_class_args(ReconstructionWriter, "prediction")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "epoch{epoch:03d}-val_loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.feature_dim", "model.init_args.patch_dim", apply_on="instantiate")
        parser.link_arguments(
            "data.modality_specs", "model.init_args.modalities", apply_on="instantiate"
        )
        # Only models with a target_info argument (downstream tasks) receive it.
        parser.link_arguments(
            "data.target_info", "model.init_args.target_info", apply_on="instantiate"
        )


    def _parse_ckpt_path(self) -> None:
        super()._parse_ckpt_path()
        # Lightning passes the checkpoint's hyper-parameters through ``dict_kwargs``,
        # which would also catch linked values for arguments the model does not have
        # (target_info for pre-training). Keep only the model's own arguments.
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        if model is None or not model.get("dict_kwargs"):
            return
        init_args = model.get("init_args")
        for key, value in dict(model["dict_kwargs"]).items():
            if init_args is not None and key in init_args:
                init_args[key] = value
        del model["dict_kwargs"]

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_model_arguments(config.get("model"))
        if self.subcommand == "predict":
            prepare_prediction(config)

        data = config.get("data")
        data_args = data.get("init_args") if data is not None else None
        if data_args is None:
            return

        if config.get("ckpt_path") == "last":
            resolve_last_checkpoint(config, self.subcommand)
        if self.subcommand == "fit" and not config.get("ckpt_path"):
            check_fixed_version(config)

        # Evaluating or resuming a checkpoint reuses the data state saved in it.
        ckpt_path = config.get("ckpt_path")
        keywords = ("last", "best", "hpc", "registry")
        if ckpt_path and ckpt_path not in keywords and "restore_from" in data_args:
            data_args["restore_from"] = data_args.get("restore_from") or str(ckpt_path)

        # Fine-tuning reuses the features and groups the pre-trained tokenizers expect.
        model_args = (config.get("model") or {}).get("init_args") or {}
        pretrained = model_args.get("pretrained")
        if pretrained and "features_from" in data_args and not data_args.get("features_from"):
            data_args["features_from"] = str(pretrained)

    def _check_processes(self, splits: list[str]) -> None:
        check = getattr(self.datamodule, "check_processes", None)
        processes = self.trainer.num_devices * self.trainer.num_nodes
        if check is not None and processes > 1:
            check(processes, splits)

    # Lightning calls these after building the classes and before the run writes anything.
    def before_fit(self) -> None:
        self._check_processes(["val"])

    def before_validate(self) -> None:
        self._check_processes(["val"])

    def before_test(self) -> None:
        self._check_processes(["test"])

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # The always-configured checkpoint callback must not block enable_checkpointing: false.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)


def run_folder(config: Any) -> tuple[Path, dict | None]:
    """Return the folder holding the ``version_*`` folders of the configured logger.

    Also returns the logger's ``init_args`` (None without a configurable logger), so
    that a resumed run can be pointed at the version it continues.
    """
    trainer = config.get("trainer") or {}
    root = Path(trainer.get("default_root_dir") or ".")
    logger = trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if hasattr(logger, "get"):  # a dict or a jsonargparse Namespace
        init_args = logger.get("init_args") or {}
        save_dir = Path(init_args.get("save_dir") or root)
        name = init_args.get("name")
        return (save_dir / name if name else save_dir), init_args
    return root / "lightning_logs", None


def run_config_version(config: Any, folder: Path) -> Path | None:
    """Return the version folder that a ``--config`` file was saved in, if any.

    A run's saved ``config.yaml`` (or ``config.resumed-*.yaml``) sits in its version
    folder, so ``--config runs/x/version_3/config.yaml --ckpt_path last`` means that
    version, not the newest one.
    """
    for config_file in config.get("config") or []:
        name = os.fspath(config_file) if hasattr(config_file, "__fspath__") else str(config_file)
        path = Path(name).resolve()
        if path.parent.name.startswith("version_") and path.parent.parent == folder.resolve():
            return path.parent
    return None


def resolve_last_checkpoint(config: Any, subcommand: str | None) -> None:
    """Turn ``--ckpt_path last`` into the newest ``last.ckpt`` of earlier runs.

    Lightning looks for ``last`` only in the folder of the run being started, which
    is a new version. Here the earlier versions of the same logger (or the configured
    ``checkpoint.dirpath``) are searched, and a config file saved in a version folder
    selects that version. ``fit`` resumes the newest ``last.ckpt`` and reuses its
    version, so curves and checkpoints continue in the same folder. Without any, it
    starts from scratch, so one command serves both the first start and every restart
    of a pre-empted job. The other commands need a checkpoint.
    """
    log = logging.getLogger("morpheus_pl")
    dirpath = (config.get("checkpoint") or {}).get("dirpath")
    folder, logger_args = run_folder(config)
    if dirpath:
        candidates = [Path(dirpath) / "last.ckpt"]
    else:
        version = (logger_args or {}).get("version")
        chosen = run_config_version(config, folder)
        if chosen is not None:
            candidates = [chosen / "checkpoints" / "last.ckpt"]
        elif version is not None:
            name = version if isinstance(version, str) else f"version_{version}"
            candidates = [folder / name / "checkpoints" / "last.ckpt"]
        else:
            candidates = list(folder.glob("version_*/checkpoints/last.ckpt"))
    found = [c for c in candidates if c.is_file()]
    if not found:
        where = candidates[0] if len(candidates) == 1 else folder / "version_*" / "checkpoints"
        if subcommand != "fit":
            raise InputError(
                f"--ckpt_path last: no last.ckpt in {where}; pass the checkpoint file to "
                f"{subcommand}, or point the config's logger (save_dir, name) at the run"
            )
        log.warning("--ckpt_path last: no last.ckpt in %s; starting from scratch", where)
        config["ckpt_path"] = None
        return
    newest = max(found, key=lambda c: c.stat().st_mtime)
    config["ckpt_path"] = str(newest)
    if subcommand != "fit":
        log.info("using %s", newest)
        return
    if not dirpath and logger_args is not None:
        version = newest.parent.parent.name
        number = version.removeprefix("version_")
        logger_args["version"] = int(number) if number.isdigit() else version
    log.info("resuming from %s", newest)


def check_fixed_version(config: Any) -> None:
    """Refuse, before anything is written, to start a run in a finished run's version."""
    folder, logger_args = run_folder(config)
    version = (logger_args or {}).get("version")
    if version is None:
        return
    name = version if isinstance(version, str) else f"version_{version}"
    if (folder / name / "config.yaml").exists():
        raise InputError(
            f"{folder / name} already contains an earlier run (its config.yaml); leave "
            "trainer.logger.init_args.version unset to start a new version, or resume that "
            "run with --ckpt_path last"
        )


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config in the run folder, without ever overwriting one.

    A resumed run keeps the first ``config.yaml`` and adds its own beside it. Any
    other run that finds a config in its folder is stopped before it writes anything,
    with the options that avoid the clash.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective call, so every process makes it
        if log_dir is not None and (Path(log_dir) / self.config_filename).exists():
            if trainer.ckpt_path or self.config.get("ckpt_path"):
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                self.config_filename = f"config.resumed-{stamp}.yaml"
            else:
                raise InputError(
                    f"{log_dir} already contains the config.yaml of an earlier run; resume that "
                    "run with --ckpt_path last, or write this one elsewhere (another "
                    "trainer.logger.init_args.name or save_dir, or without a logger another "
                    "trainer.default_root_dir)"
                )
        super().setup(trainer, pl_module, stage)


def prepare_prediction(config: Any) -> None:
    """Check the prediction request and choose where ``predict`` writes.

    ``predict`` logs nothing: without ``--prediction.output_dir`` the files go to
    ``predictions/<time>/`` beside the checkpoint's ``checkpoints/`` folder, and the
    resolved config is saved there too.
    """
    prediction = config.get("prediction")
    if prediction is None:
        return
    # With --ckpt_path, Lightning has already put the checkpoint's hyper-parameters
    # (the modalities among them) into the model's config.
    model = config.get("model") or {}
    model_class = import_class(str(model.get("class_path", "")))
    if model_class is not None and not issubclass(model_class, morpheus_pl.pretraining.MaskedOmicsPretraining):
        raise InputError(
            f"predict embeds patients and reconstructs omics with a pre-training model, not "
            f"{model_class.__name__}; pass a pre-training config and checkpoint"
        )
    model_args = model.get("init_args") or {}
    modalities = list(model_args.get("modalities") or [])
    if modalities:
        resolve_request(prediction.get("inputs"), prediction.get("targets"), modalities, modalities)
    else:
        inputs = prediction.get("inputs")
        if inputs is not None and SLIDE not in inputs:
            raise InputError(
                f"prediction inputs {list(inputs)} do not include the slide: MORPHEUS always "
                "encodes the slide, so add 'slide' to the inputs"
            )
    if not prediction.get("output_dir"):
        ckpt_path = config.get("ckpt_path")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(ckpt_path).resolve().parent.parent if ckpt_path else Path("runs")
        prediction["output_dir"] = str(base / "predictions" / stamp)
    config["trainer"]["logger"] = False
    config["trainer"]["default_root_dir"] = prediction["output_dir"]


def import_class(class_path: str) -> type | None:
    """Import a class from its dotted path; None when it cannot be imported."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return None


def check_model_arguments(model: Any) -> None:
    """Run the model class's own argument checks before anything is built.

    Errors raised while jsonargparse instantiates a class come back wrapped in a long
    dump of every argument, so classes with a ``check_arguments`` static method get
    their arguments checked here first, where an ``InputError`` stays readable.
    """
    if model is None or not model.get("class_path"):
        return
    cls = import_class(str(model["class_path"]))
    check = getattr(cls, "check_arguments", None)
    if callable(check):
        init_args = model.get("init_args")
        check(dict(init_args) if init_args is not None else {})


#: Commands outside LightningCLI's subcommands, each taking the whole argument list.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    **{name: run_protocol for name in PROTOCOLS},
    "report": run_report,
    **{name: run_converter for name in CONVERTERS},
}

EPILOG = (
    "more commands: cv, fewshot and sweep (evaluation protocols that end in a table), "
    "report (reconstruction report of a pre-training checkpoint), convert-slides and "
    "convert-omics (bring patch features and omics matrices in); add --help to any of them"
)


def quiet_library_noise() -> None:
    """Set up logging, without the messages libraries print on every run."""
    # LightningCLI 2.6 calls jsonargparse APIs that warn about deprecation on every run.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Lightning's advertisement for its cloud logger, and a deprecation inside
    # Lightning 2.6 itself.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "Tip:" not in record.getMessage()
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(args: list[str] | None = None) -> None:
    """Run the CLI; invalid input ends with its message and exit status 2."""
    quiet_library_noise()
    argv = sys.argv[1:] if args is None else list(args)
    known = {*EXTRA_COMMANDS, *LightningCLI.subcommands()}
    if argv and not argv[0].startswith("-") and argv[0] not in known:
        logging.getLogger("morpheus_pl").error(
            "unknown command %r; choose from %s", argv[0], ", ".join(sorted(known))
        )
        sys.exit(2)
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[argv[0]](argv)
            return
        MorpheusCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": False},
            auto_configure_optimizers=False,
            parser_kwargs={"epilog": EPILOG},
        )
    except KeyboardInterrupt:
        logging.getLogger("morpheus_pl").error("interrupted")
        sys.exit(130)
    except (InputError, MisconfigurationException) as error:
        hint = ""
        if "gpu" in str(error).lower() and "found" in str(error).lower():
            hint = " (no GPU here: set trainer.accelerator to cpu or auto)"
        logging.getLogger("morpheus_pl").error("%s%s", error, hint)
        sys.exit(2)
