"""What downloads itself on the user's machine: Flow-GRPO's prompt sets (python -m data fetch flowgrpo)
and the reward weights that are not on the hub (the LAION aesthetic MLP), each checked against its
pinned checksum, against a local HTTP server on 127.0.0.1 serving synthetic files of the same layout;
and the one-line errors offline, for a changed file, and for HPSv2.1 missing from the cache."""
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

import data
import rewards
from bench.sd35_plans import flowgrpo_files
from rewards import clip, preference
from test_rewards import aesthetic_state


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served/ on 127.0.0.1; yields (root folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def _serve_flowgrpo(root: Path, monkeypatch) -> dict:
    files = flowgrpo_files()
    for folder, named in files.items():
        (root / "dataset" / folder).mkdir(parents=True)
        for name, text in named.items():
            (root / "dataset" / folder / name).write_text(text)
    monkeypatch.setattr(data, "FLOWGRPO_FILES", {f: {n: data.git_blob_id(t.encode()) for n, t in named.items()}
                                                 for f, named in files.items()})
    return files


def test_fetch_writes_the_layout_the_scripts_read_with_each_task_json(server, tmp_path, monkeypatch):
    root, url = server
    _serve_flowgrpo(root, monkeypatch)
    written = data.main(["fetch", "flowgrpo", "--out", str(tmp_path / "dataset"), "--base_url", url + "dataset/"])
    assert [Path(w).name for w in written] == ["geneval", "ocr", "pickscore"]
    task = data.load_task("geneval", str(tmp_path / "dataset" / "geneval"))
    assert (task.reward, task.guidance, task.eval_key) == ("geneval=1", 1.0, "strict")
    prompts, metas = data.load_prompts(task.dataset, "test")
    assert prompts[1] == "a photo of two dogs" and metas[1]["include"][0]["count"] == 2
    assert data.load_task("ocr", str(tmp_path / "dataset" / "ocr")).reward == "ocr=1"
    mix = data.load_task("aesthetic", str(tmp_path / "dataset" / "pickscore")).reward
    assert rewards.parse_spec(mix) == {"pickscore": 0.03846, "clipscore": 3.333, "hpsv2": 1.0}


def test_the_pinned_ids_are_gits_own_blob_ids():
    assert data.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`
    assert all(len(blob) == 40 for named in data.FLOWGRPO_FILES.values() for blob in named.values())


def test_fetch_refuses_a_changed_file_and_offline_in_one_line_and_writes_nothing(server, tmp_path, monkeypatch):
    root, url = server
    _serve_flowgrpo(root, monkeypatch)
    (root / "dataset" / "ocr" / "test.txt").write_text('a sign that says "changed"\n')
    with pytest.raises(SystemExit, match=r"^error: .*ocr/test.txt is not the file this project pinned .*--unverified to"):
        data.main(["fetch", "flowgrpo", "--out", str(tmp_path / "d1"), "--base_url", url + "dataset/"])
    assert sorted(p.name for p in (tmp_path / "d1").iterdir()) == ["geneval"]  # only the folders that passed
    with socket.socket() as probe:  # nothing listens here: offline
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SystemExit, match=r"^error: cannot download http://127.0.0.1:\d+/geneval/train_metadata.jsonl "
                                         r"\(.*\): offline\?"):
        data.main(["fetch", "flowgrpo", "--out", str(tmp_path / "d2"), "--base_url", f"http://127.0.0.1:{port}/"])
    assert not (tmp_path / "d2").exists()


def test_the_aesthetic_mlp_downloads_itself_once_checked_and_says_what_to_do_offline(server, tmp_path, monkeypatch):
    import hashlib

    import huggingface_hub.constants
    root, url = server
    torch.save(aesthetic_state(8), root / "mlp.pth")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(clip, "AESTHETIC_MLP_URL", url + "mlp.pth")
    monkeypatch.setattr(clip, "AESTHETIC_MLP_SHA256", "0" * 64)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="has sha256 .*, not the pinned 000000000000"):
        clip.aesthetic_mlp_path()
    monkeypatch.setattr(clip, "AESTHETIC_MLP_SHA256", hashlib.sha256((root / "mlp.pth").read_bytes()).hexdigest())
    path = clip.aesthetic_mlp_path()
    assert path == str(tmp_path / "hub" / "diffusion-opd" / clip.AESTHETIC_MLP_NAME)
    mlp = clip.load_aesthetic_mlp(path)
    assert mlp.layers[0].in_features == 8
    (root / "mlp.pth").unlink()  # once cached, never fetched again
    assert clip.aesthetic_mlp_path() == path
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE is set: download .*mlp.pth to .*empty/diffusion-opd"):
        clip.aesthetic_mlp_path()


def test_hpsv2_missing_offline_is_one_line_naming_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HPSV2_CHECKPOINT", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        preference.hpsv2_checkpoint()
    assert "huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt" in str(e.value) and "\n" not in str(e.value)
