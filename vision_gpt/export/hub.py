"""Upload an exported model folder (a training run's `output_dir`) to the Hugging Face Hub.

Everything Hub-specific (tokens, private repos, branches, LFS/Xet transfers, retries) is huggingface_hub's: this module
only picks what to upload and says which repo and endpoint a failure concerns.
"""

import os
import sys
from pathlib import Path


def _anywhere(*patterns: str) -> list[str]:
    # upload_folder matches patterns with fnmatch on the path relative to the folder, where `*` also crosses `/`:
    # "name" only matches at the top, "*/name" at any depth below it (e.g. inside `fp16/`).
    return [variant for pattern in patterns for variant in (pattern, f"*/{pattern}")]


IGNORE_PATTERNS: list[str] = [
    # Trainer checkpoints: a full model copy plus optimizer, scheduler, scaler and RNG states each (several times the
    # model's size); the exported files at the top of the folder are the model.
    *_anywhere("checkpoint-*"),
    # TensorBoard event files (Trainer's default logging dir is `output_dir/runs/`) and other trackers' local folders.
    *_anywhere("runs/", "*events.out.tfevents*", "wandb/", "mlruns/", "lightning_logs/"),
    # Log files (`train.log`).
    *_anywhere("*.log"),
    # `--save_adapters`' unmerged model and PEFT adapter files: a second model, whose adapter config names a local
    # folder; the repo's weights have the adapters merged.
    "unmerged/*", "adapters/*",
    # Resume state that Trainer can leave next to a model: pickled, useless for inference, and the Hub flags pickles.
    *_anywhere("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth", "training_args.bin"),
    # Python, notebook and OS debris (importing the remote-code files from the folder writes `__pycache__/`).
    *_anywhere("__pycache__/", "*.pyc", ".ipynb_checkpoints/", ".DS_Store", "*.tmp", "*.lock"),
]
"""
`upload_folder` ignore patterns (fnmatch on folder-relative paths; a trailing `/` means the folder's contents) for
training leftovers that are not part of a Hub model repo. huggingface_hub adds its own (`.git/`,
`.cache/huggingface/`). Kept: weights, configs, remote code, processor files, `README.md`, `fp16/`, and small training
records (`training_config.json`, `*_results.json`, `trainer_state.json`, curve PNGs).
"""

# A folder is a model repo when transformers can load it: a config and weights, whole or sharded.
_REQUIRED_CONFIG = "config.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class HubPushError(OSError):
    """
    A push failed without an HTTP error answer from the Hub's API: the endpoint could not be reached (refused
    connection, DNS, timeout) or an LFS upload failed (huggingface_hub wraps that in a RuntimeError). The message names
    the repo, endpoint and step; `__cause__` is the client's error. HTTP errors answered by the API are re-raised as
    huggingface_hub's own `HfHubHTTPError` subclasses (e.g. `RepositoryNotFoundError`, so callers can catch them) with
    the repo, endpoint and step appended to their message.
    """


def push_folder(
    folder,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload vision-gpt model",
    endpoint: str | None = None,
) -> str:
    """
    Upload the exported model repo in `folder` (FP32 files, `fp16/`, model card, remote code, processor files) to the
    Hub model repo `repo_id` in one commit, creating the repo (and the branch `revision`, if not "main") when missing.
    Training leftovers in the folder ([`IGNORE_PATTERNS`]: `checkpoint-*/`, `runs/`, `*.log`, ...) are skipped.
    Returns the commit URL.

    `token`: a Hub token with write access (default: huggingface_hub's, i.e. `HF_TOKEN` or `hf auth login`).
    `private`: create the repo private (ignored if it exists; `None` = the account's default).
    `revision`: the branch to commit to (default: main); it is branched off main when it doesn't exist.
    `endpoint`: the Hub's URL (default: `HF_ENDPOINT`, read at call time, else huggingface.co).

    Example:
        ```py
        from vision_gpt import push_folder

        url = push_folder("runs/flickr8k", "me/vit-gpt2-flickr8k", private=True, revision="v1")
        ```
    """
    folder = Path(folder)
    _check_model_folder(folder)

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; its own check would only fire at the first request, with
    # a message about "reaching" a URL. Fail before any work, and say how to fix it.
    is_offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)
    if is_offline():
        raise OfflineModeIsEnabled(
            f"HF_HUB_OFFLINE=1 is set; unset it to push (or TRANSFORMERS_OFFLINE, which implies it) '{folder}' to "
            f"'{repo_id}'. huggingface_hub reads it when first imported, so unset it before starting Python."
        )

    # huggingface_hub turns HF_ENDPOINT into a constant at import time; reading it here lets it be set later.
    api = huggingface_hub.HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    context = f"pushing '{folder}' to the model repo '{repo_id}' at {api.endpoint}"

    _readdress_cards(folder, repo_id)
    with _errors_name(context, "create_repo"):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != constants.DEFAULT_REVISION:
        with _errors_name(context, f"create_branch '{revision}'"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with _errors_name(context, "upload_folder"):
        info = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(IGNORE_PATTERNS),  # upload_folder appends its own defaults to the list it gets
        )
    return str(info.commit_url or info.oid)


def _readdress_cards(folder: Path, repo_id: str) -> None:
    """A card written for another repo id (a training run without --hub-model-id names it after its folder) points its
    usage lines and widget at `repo_id`, where it is going: in the folder, so that folder and repo agree."""
    from .model_card import readdress_model_card

    for card in (folder / "README.md", folder / "fp16" / "README.md"):
        if card.is_file():
            text = card.read_text()
            readdressed = readdress_model_card(text, repo_id)
            if readdressed != text:
                card.write_text(readdressed)


def _check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"Cannot push '{folder}': no such folder. Pass the output folder of a training run or export.")
    missing = []
    if not (folder / _REQUIRED_CONFIG).is_file():
        missing.append(_REQUIRED_CONFIG)
    if not any((folder / name).is_file() for name in _WEIGHTS):
        missing.append(" or ".join(_WEIGHTS))
    if missing:
        raise ValueError(
            f"Cannot push '{folder}': it is not an exported model repo (missing {', '.join(missing)}). Export the "
            "model first (vision_gpt.export.export_repo or `vision-gpt assemble`) and push that folder."
        )


class _errors_name:
    """Context manager adding which step, repo and endpoint failed to huggingface_hub's network and HTTP errors."""

    def __init__(self, context: str, step: str):
        self.note = f"\n(vision-gpt: {context}, during {step}.)"
        self.summary = f"Failed {context} during {step}"

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None:
            return False
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        if isinstance(error, HfHubHTTPError):
            # Keep huggingface_hub's type (callers may catch RepositoryNotFoundError etc.) and its server message.
            error.append_to_message(self.note)
            return False
        if isinstance(error, OfflineModeIsEnabled) or not _is_transport_error(error):
            return False
        # Connection refused, DNS, timeouts, or an LFS upload failure that huggingface_hub wraps in a RuntimeError.
        raise HubPushError(f"{self.summary}: {_describe(error)}") from error


def _is_transport_error(error: BaseException) -> bool:
    # huggingface_hub 1.x raises httpx errors, 2.x httpx2 ones; look them up among the modules it has imported rather
    # than importing either here. OSError covers requests-based clients and socket errors.
    http_errors = tuple(
        module.HTTPError for module in (sys.modules.get("httpx"), sys.modules.get("httpx2"))
        if module is not None and isinstance(getattr(module, "HTTPError", None), type)
    )
    chain = error
    while chain is not None:
        if isinstance(chain, (OSError, *http_errors)):
            return True
        chain = chain.__cause__
    return False


def _describe(error: BaseException) -> str:
    # huggingface_hub sometimes wraps the informative error (e.g. "Error while uploading 'x'" from a 403 on the PUT).
    # httpx also re-raises its transport's identically named error; say each message once.
    messages = []
    while error is not None:
        message = f"{type(error).__name__}: {error}"
        if message not in messages:
            messages.append(message)
        error = error.__cause__
    return " <- ".join(messages)
