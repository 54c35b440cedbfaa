"""`push_folder` end to end: huggingface_hub's real client against the loopback Hub stub in `hub_stub.py`."""

import hashlib
import socket

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from vision_gpt.export.repo import export_repo
from vision_gpt.export.hub import HubPushError, push_folder

from .conftest import tiny_model
from .hub_stub import HubStub

# huggingface_hub's own LFS PUT passes a file object as `data=`, which its HTTP client deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

TOKEN = "hf_test_token"
REPO_ID = "user/tiny-captioner"
LEFTOVERS = {  # what a training run leaves next to the exported repo; none of it may reach the Hub
    "checkpoint-2/optimizer.pt": b"optimizer state",
    "checkpoint-2/model.safetensors": b"an intermediate checkpoint",
    "runs/Jan01_00-00-00_host/events.out.tfevents.1.host": b"tensorboard events",
    "train.log": b"step 1 loss 9.0\n",
    "training_args.bin": b"pickled TrainingArguments",
}
MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json", "README.md", "configuration_vision_gpt.py",
               "modeling_vision_gpt.py", "processing_vision_gpt.py", "pipeline_vision_gpt.py",
               "processor_config.json", "tokenizer.json", "tokenizer_config.json"}


def local_files(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, processor):
    """An exported repo (FP32 + fp16/) with training leftovers around it, and the files that should be uploaded."""
    folder = tmp_path_factory.mktemp("push") / "run"
    export_repo(tiny_model(), processor, folder, repo_id=REPO_ID, vision_model="v", text_model="t")
    expected = local_files(folder)
    for name, content in LEFTOVERS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder, expected


@pytest.fixture
def hub(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 and huggingface_hub copied it into `constants` at import, which blocks every
    # request; these tests only talk to the loopback stub, so lift it for the test (monkeypatch restores it).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # With hf_xet installed huggingface_hub uploads LFS files through Xet storage, a protocol the stub does not model;
    # disabling it gives the classic LFS batch + PUT path that the stub answers.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    with HubStub(token=TOKEN) as stub:
        yield stub
    assert not stub.unknown_requests, [(r.method, r.path) for r in stub.unknown_requests]


def test_push_uploads_exactly_the_model_files_to_a_private_branch(exported, hub):
    folder, expected = exported
    url = push_folder(folder, REPO_ID, token=TOKEN, private=True, revision="v1", endpoint=hub.url)

    repo = hub.repo(REPO_ID)
    received = repo.received("v1")
    assert MODEL_FILES | {f"fp16/{name}" for name in MODEL_FILES} <= set(expected)
    assert sorted(received) == sorted(expected)  # every model file, no leftover
    for path, content in expected.items():
        assert received[path] == content, f"{path} arrived with different bytes"
    assert repo.trees["v1"] == expected and repo.trees["main"] == {} and repo.received("main") == {}
    # The weights went through LFS (batch, PUT, verify), the rest inline in the commit.
    assert repo.upload_modes("v1")["model.safetensors"] == "lfs"
    assert repo.upload_modes("v1")["config.json"] == "regular"
    assert hub.lfs_objects[hashlib.sha256(expected["model.safetensors"]).hexdigest()] == expected["model.safetensors"]

    assert repo.private and repo.create_payloads == [{"name": "tiny-captioner", "organization": "user",
                                                      "visibility": "private", "type": "model"}]
    assert repo.branches_created == [("v1", "main")]
    assert len(repo.commits) == 1 and repo.commits[0].summary == "Upload vision-gpt model"
    assert url == f"{hub.url}/{REPO_ID}/commit/{repo.heads['v1']}"
    # The token went with every API call; only the (presigned, on the real Hub) storage PUTs carry none.
    assert {r.authorization for r in hub.requests if r.route != "lfs_store"} == {f"Bearer {TOKEN}"}
    assert {(r.method, r.route) for r in hub.requests} == {
        ("POST", "create_repo"), ("POST", "create_branch"), ("POST", "validate_yaml"), ("POST", "preupload"),
        ("POST", "lfs_batch"), ("PUT", "lfs_store"), ("POST", "lfs_verify"), ("POST", "commit")}
    assert all(r.status == 200 for r in hub.requests)


def test_second_push_of_an_unchanged_folder_is_a_no_op_and_a_change_uploads_only_that(exported, hub, monkeypatch,
                                                                                        tmp_path):
    folder, expected = exported
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read at call time, after huggingface_hub was imported
    first = push_folder(folder, REPO_ID, token=TOKEN)
    second = push_folder(folder, REPO_ID, token=TOKEN)  # create_repo answers 409: exist_ok

    repo = hub.repo(REPO_ID)
    assert len(repo.create_payloads) == 2 and not repo.private  # private=None: the stub's default, public
    assert len(repo.commits) == 1 and first == second  # nothing changed: no commit, the same head
    assert repo.trees["main"] == expected

    # A changed card alone is committed; everything else is recognised by its oid and skipped.
    changed = tmp_path / "changed"
    changed.mkdir()
    for path, content in expected.items():
        (changed / path).parent.mkdir(parents=True, exist_ok=True)
        (changed / path).write_bytes(content)
    (changed / "README.md").write_text((folder / "README.md").read_text() + "\nRetrained.\n")
    third = push_folder(changed, REPO_ID, token=TOKEN, commit_message="Update card")
    assert len(repo.commits) == 2 and third != first
    assert repo.commits[1].files == {"README.md": (changed / "README.md").read_bytes()}
    assert repo.commits[1].summary == "Update card"


def test_folder_that_is_not_a_model_repo_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        push_folder(tmp_path / "missing", REPO_ID)
    (tmp_path / "README.md").write_text("# not a model\n")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"'{tmp_path}'.*missing model\.safetensors"):
        push_folder(tmp_path, REPO_ID)


def test_offline_mode_is_reported_before_any_request(exported, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE=1 is set; unset it to push"):
        push_folder(exported[0], REPO_ID, endpoint="http://127.0.0.1:9")


def test_http_and_connection_errors_name_the_repo_and_endpoint(exported, hub):
    folder, _ = exported
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as error:
        push_folder(folder, REPO_ID, token="hf_wrong", endpoint=hub.url)
    assert error.value.response.status_code == 401
    assert f"'{REPO_ID}' at {hub.url}, during create_repo" in str(error.value)
    assert not hub.repos

    # A loopback port nobody listens on: connection refused at once (create_repo makes a single attempt).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(HubPushError, match=rf"'{REPO_ID}' at {endpoint} during create_repo: ConnectError"):
        push_folder(folder, REPO_ID, token=TOKEN, endpoint=endpoint)


@pytest.mark.parametrize("path, uploaded", [
    ("model.safetensors", True), ("fp16/model.safetensors", True), ("README.md", True), ("loss.png", True),
    ("training_config.json", True), ("trainer_state.json", True), ("tokenizer.json", True),
    ("checkpoint-500/model.safetensors", False), ("fp16/checkpoint-1/optimizer.pt", False),
    ("runs/Jan01/events.out.tfevents.1.host", False), ("events.out.tfevents.2.host", False), ("train.log", False),
    ("fp16/train.log", False), ("training_args.bin", False), ("optimizer.pt", False), ("rng_state_0.pth", False),
    ("__pycache__/modeling_vision_gpt.cpython-311.pyc", False), ("wandb/run-1/files/config.yaml", False),
])
def test_ignore_patterns(path, uploaded):
    # The same matching upload_folder applies (fnmatch on folder-relative paths, trailing "/" = folder contents).
    from huggingface_hub.utils import filter_repo_objects

    from vision_gpt.export.hub import IGNORE_PATTERNS

    assert list(filter_repo_objects([path], ignore_patterns=IGNORE_PATTERNS)) == ([path] if uploaded else [])


def test_training_run_pushes_its_output_folder(hub, tmp_path, tokenizer, monkeypatch):
    """`scripts/train.py --push_to_hub` end to end: the trained repo arrives, training leftovers do not."""
    from vision_gpt.training.train import main

    from .data_fixtures import save_tiny_towers, write_flickr8k

    vision, text = save_tiny_towers(tmp_path, tokenizer)
    data = write_flickr8k(tmp_path / "f8k", train=2, val=1, test=1)
    output = tmp_path / "out"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    main(["--vision_model", vision, "--text_model", text, "--dataset", "flickr8k", "--data_dir", str(data),
          "--output_dir", str(output), "--feature_cache_dir", str(tmp_path / "cache"), "--max_steps", "1",
          "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "1",
          "--eval_strategy", "no", "--load_best_model_at_end", "false", "--caption_metrics", "false",
          "--report_to", "none", "--push_to_hub", "true", "--hub_model_id", REPO_ID, "--hub_token", TOKEN,
          "--hub_private_repo", "true"])
    files = hub.repo(REPO_ID).received("main")
    assert files["model.safetensors"] == (output / "model.safetensors").read_bytes()
    assert files["fp16/model.safetensors"] == (output / "fp16" / "model.safetensors").read_bytes()
    assert "README.md" in files and "training_config.json" in files and "loss.png" in files
    assert (output / "checkpoint-1").is_dir() and (output / "train.log").is_file()
    assert not [name for name in files if name.startswith("checkpoint-") or name.endswith(".log")]


def test_a_card_written_for_the_folder_name_is_readdressed_to_the_pushed_repo(tmp_path, processor, hub):
    # A training run without --hub-model-id names its card after its folder; `push` tells the card where it went.
    folder = tmp_path / "run"
    export_repo(tiny_model(), processor, folder, repo_id="run", license="mit", vision_model="v", text_model="t")
    push_folder(folder, REPO_ID, token=TOKEN, endpoint=hub.url)
    for card in ("README.md", "fp16/README.md"):
        received = ModelCard(hub.repo(REPO_ID).received("main")[card].decode())
        assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in received.text
        assert received.data.widget[0]["src"] == f"https://huggingface.co/{REPO_ID}/resolve/main/example.jpg"
        assert (folder / card).read_text() == str(received)  # the folder now says what the Hub holds
