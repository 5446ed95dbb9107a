"""`hf-prefalign push` and `pull`: upload a saved backbone, preference embedding or bank to the Hub, and download
one; `push` leaves out the training state (`_TRAINING_STATE`) a Trainer writes beside the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_prefalign.cli import common


@dataclass
class PushArguments:
    repo_id: str = field(metadata={"help": "The Hub repo, 'owner/name'."})
    path: str = field(default=".", metadata={"help": "The saved backbone, preference embedding or bank to upload."})
    revision: str | None = field(default=None, metadata={"help": "The branch to push to."})
    private: bool = field(default=False, metadata={"help": "Create the repo private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})


@dataclass
class PullArguments:
    repo_id: str = field(metadata={"help": "The Hub repo, 'owner/name'."})
    path: str = field(default=".", metadata={"help": "Where to put the files."})
    subfolder: str | None = field(default=None, metadata={"help": "One user's folder of a bank repo."})
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})


def _push_arguments() -> tuple[type, ...]:
    """`push`'s flags: `PushArguments`."""
    return (PushArguments,)


def _pull_arguments() -> tuple[type, ...]:
    """`pull`'s flags: `PullArguments`."""
    return (PullArguments,)


def _push(argv: list[str]) -> int:
    import shutil

    from hf_prefalign.hub.transfer import push_folder

    (args,) = common._parse("push", _push_arguments(), argv)
    source = Path(args.path)
    if not (source / "config.json").is_file() and not (source / "bank.json").is_file():
        raise FileNotFoundError(f"{source} holds no saved backbone, preference embedding or bank (no config.json).")
    skipped = sorted({p.name for pattern in _TRAINING_STATE for p in source.glob(pattern)})
    if skipped:
        print(f"not uploading training state: {', '.join(skipped)}")
    url = push_folder(
        lambda folder: shutil.copytree(
            source, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*_TRAINING_STATE)
        ),
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
    )
    print(f"pushed {source} to {args.repo_id}: {url}")
    return 0


# What a Trainer leaves in its output_dir besides the model: never part of an uploaded artefact.
_TRAINING_STATE = (
    "checkpoint-*",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "trainer_state.json",
    "runs",
)


def _pull(argv: list[str]) -> int:
    import shutil

    from hf_prefalign.hub.transfer import pull_folder
    from hf_prefalign.utils.paths import validate_relative_path

    (args,) = common._parse("pull", _pull_arguments(), argv)
    if args.subfolder is not None:
        validate_relative_path(args.subfolder, "--subfolder")  # before anything is downloaded or copied
    folder = pull_folder(args.repo_id, subfolder=args.subfolder, revision=args.revision, token=args.token)
    shutil.copytree(folder, args.path, dirs_exist_ok=True)
    print(f"pulled {args.repo_id}{'/' + args.subfolder if args.subfolder else ''} into {args.path}")
    return 0
