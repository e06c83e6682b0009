"""docs/sd35.md's commands, parsed out of the page (not copied), run one after another with their own
flags on a stand-in of what a GPU user has: `stabilityai/stable-diffusion-3.5-medium` is a tiny random
pipeline of the SD3.5 architecture (dual-attention blocks, RMS qk-norm); the reward models are tiny ones
of the same classes (CLIP for PickScore and CLIPScore, Mask2Former + CLIP for GenEval, the LAION MLP);
Flow-GRPO's prompt files are synthetic files of the same layout served from 127.0.0.1; the release's
teachers sit in a stand-in hub cache; each command gets tiny sizes appended (1 step, 2-4 images, 2
sampling steps). Two rewards have no stand-in of their class here: the OCR engine (none installed; the
ocr reward runs with a stand-in reader) and HPSv2.1 (the hpsv2 package is not installed; a CLIP cosine
stands in). A command that stops parsing or running fails here; so does the page losing a command."""
import http.server
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

import data
import nft
import opd
import rewards
import teacher_rl
from bench.sd35_plans import flowgrpo_files, page_commands
from study import table as table_cli

ROOT = Path(__file__).resolve().parents[2]
SD35 = "stabilityai/stable-diffusion-3.5-medium"
STAGE1 = ["--steps", "1", "--batch", "4", "--group_size", "2", "--rollout_batch", "4", "--train_batch", "4",
          "--updates_per_rollout", "1", "--num_steps", "2", "--eval_prompts", "2", "--eval_steps", "2", "--height",
          "0", "--width", "0", "--lora_rank", "4", "--lora_alpha", "8"]
OPD = ["--steps", "1", "--prompts_per_batch", "2", "--num_steps", "2", "--eval_prompts", "2", "--eval_steps", "2",
       "--height", "0", "--width", "0", "--lora_rank", "4", "--lora_alpha", "8"]
TABLE = ["--prompts", "2", "--steps", "2", "--batch", "2", "--grid_prompts", "1", "--height", "0", "--width", "0"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """Everything the page's commands reach for, with the module's environment pointed at it."""
    import huggingface_hub.constants

    from model import FlowModel
    from test_rewards import aesthetic_state, clip_processor, save_tiny_clip, save_tiny_detector
    from toy.pipeline import TinySD3Config, build_tiny_pipeline
    root = tmp_path_factory.mktemp("sd35")
    build_tiny_pipeline(TinySD3Config(dual_attention_layers=(0,), qk_norm="rms_norm"), seed=5).save_pretrained(
        root / "sd35")
    clip, pick = save_tiny_clip(root / "clip", seed=0), save_tiny_clip(root / "pick", seed=1)
    clip_processor().save_pretrained(root / "pick_processor")
    torch.save(aesthetic_state(8, seed=3), root / "mlp.pth")  # the tiny CLIP's projection has 8 dims
    files = flowgrpo_files()
    served = root / "served" / "dataset"
    for folder, named in files.items():
        (served / folder).mkdir(parents=True)
        for name, text in named.items():
            (served / folder / name).write_text(text)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root / "served"), **kwargs)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # the release's teachers in a stand-in hub cache: PEFT folders that name no base and no task
    hub = root / "hub" / "models--quanhaol--DiffusionOPD"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(commit)
    for i, name in enumerate(("GenEvalTeacher", "OCRTeacher", "AesTeacher")):
        m = FlowModel.load(str(root / "sd35"))
        with torch.no_grad():
            for p in m.add_student_lora(rank=4, alpha=8, seed=i):
                p.normal_(0, 0.1)
        folder = hub / "snapshots" / commit / name / "lora"
        m.save_student(folder)
        (folder / "run_config.json").unlink()
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.MonkeyPatch.context() as mp:
        for env, value in {"CLIP_MODEL": clip, "PICKSCORE_MODEL": pick, "PICKSCORE_PROCESSOR": str(root / "pick_processor"),
                           "GENEVAL_DETECTOR": save_tiny_detector(root / "detector"),
                           "AESTHETIC_MLP": str(root / "mlp.pth")}.items():
            mp.setenv(env, value)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
        mp.setattr(data, "FLOWGRPO_FILES", {f: {n: data.git_blob_id(t.encode()) for n, t in named.items()}
                                            for f, named in files.items()})
        mp.setitem(rewards.REWARDS, "ocr", lambda device, dtype, **o: rewards.ocr._ocr(device, dtype, reader=lambda a: "Open"))
        mp.setitem(rewards.REWARDS, "hpsv2", lambda device, dtype, **o: rewards.REWARDS["clipscore"](device, dtype))
        mp.setattr(rewards.registry, "_LOADED", {})
        yield {"root": root, "url": f"http://127.0.0.1:{server.server_address[1]}/dataset/"}
    server.shutdown()


def _stand_in_args(argv: list[str], root: Path) -> list[str]:
    """The command's own arguments with the stand-in's places: the base, and dataset/, ckpts/, runs/."""
    def place(token: str) -> str:
        token = token.replace(SD35, str(root / "sd35"))
        return re.sub(r"(^|[=+])(dataset|ckpts|runs)(/|$)", lambda m: f"{m.group(1)}{root / m.group(2)}{m.group(3)}",
                      token)
    return [place(t) for t in argv]


def _run(argv: list[str], stand_in: dict) -> str:
    """One page command in this process: its module's main with its own flags, then the stand-in's sizes."""
    root = stand_in["root"]
    if argv[:2] == ["python", "-m"] and argv[2] == "data":
        data.main([*_stand_in_args(argv[3:], root), "--base_url", stand_in["url"]])
        return "data"
    assert argv[0] == "torchrun" and argv[1].startswith("--nproc_per_node="), argv
    rest = argv[2:]
    target, args = (rest[1], rest[2:]) if rest[0] == "-m" else (rest[0].removesuffix(".py"), rest[1:])
    main, sizes = {"teacher_rl": (teacher_rl.main, STAGE1), "nft": (nft.main, STAGE1), "opd": (opd.main, OPD),
                   "study.table": (table_cli.main, TABLE)}[target]
    base = ["--model", str(root / "sd35")] if target in ("teacher_rl", "nft") and "--model" not in args else []
    main([*base, *_stand_in_args(args, root), *sizes])  # the paper's default base is SD3.5-M: its stand-in
    return target


def test_the_page_holds_the_papers_whole_pipeline():
    kinds = [(c[2] if c[0] == "python" else c[2] if c[2] != "-m" else c[3]) for c in page_commands()]
    assert kinds == ["data", "nft.py", "teacher_rl.py", "teacher_rl.py", "opd.py", "opd.py", "study.table"], kinds


def test_every_command_of_the_page_runs_on_the_stand_in(stand_in):
    root = stand_in["root"]
    ran = [_run(c, stand_in) for c in page_commands()]
    assert ran == ["data", "nft", "teacher_rl", "teacher_rl", "opd", "opd", "study.table"]
    assert json.loads((root / "dataset" / "geneval" / "task.json").read_text())["eval_key"] == "strict"
    saved = {t: json.loads((root / "ckpts" / t / "checkpoint" / "run_config.json").read_text()) for t in
             ("geneval", "ocr", "aesthetic")}
    assert saved["geneval"]["algorithm"] == "nft" and saved["geneval"]["guidance"] == 1.0
    assert saved["ocr"]["algorithm"] == saved["aesthetic"]["algorithm"] == "grpo-guard"
    assert json.loads((root / "ckpts" / "ocr" / "config.json").read_text())["clip_range"] == 2e-6
    assert json.loads((root / "ckpts" / "aesthetic" / "config.json").read_text())["clip_range"] == 4e-6
    for run in ("opd", "opd-release"):
        assert json.loads((root / "runs" / run / "checkpoint" / "run_config.json").read_text())["tasks"] == \
            ["geneval", "ocr", "aesthetic"]
    table = json.loads((root / "runs" / "table1" / "table.json").read_text())
    assert [t["name"] for t in table["tasks"]] == ["geneval", "ocr", "pickscore", "clipscore", "hpsv2", "aesthetic"]
    assert [m["name"] for m in table["models"]][:2] == ["sd35m", "opd"]


def test_the_dry_run_of_the_opd_command_plans_in_seconds_and_loads_nothing(stand_in, monkeypatch, capsys):
    from model import FlowModel
    root = stand_in["root"]
    if not (root / "ckpts" / "ocr" / "checkpoint").is_dir():
        pytest.skip("needs the teachers of the full run (test_every_command_of_the_page_runs_on_the_stand_in)")
    monkeypatch.setattr(FlowModel, "load", lambda *a, **k: pytest.fail("--dry_run loaded a model"))
    command = next(c for c in page_commands() if c[2] == "opd.py" and "--model" not in c)
    argv = [*_stand_in_args(command[3:], root), *OPD, "--dry_run", "--out", str(root / "runs" / "dry")]
    # here, as on a machine without an OCR engine: the dry run says so in one line
    with pytest.raises(SystemExit, match=r"^error: ocr reward .* needs an OCR engine: pip install -r requirements-rewards"):
        opd.main(argv)
    monkeypatch.setitem(rewards.CHECKS, "ocr", lambda **o: ["stand-in reader"])
    monkeypatch.setitem(rewards.CHECKS, "hpsv2", lambda **o: ["stand-in CLIP cosine"])
    for name in ("ocr", "hpsv2"):  # the dry run builds each reward: these two from their stand-ins
        monkeypatch.setitem(rewards.REWARDS, name, lambda device, dtype, **o: None)
    start = time.perf_counter()
    opd.main(argv)
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 20 and "; no budget; " in err and "dry run: every input" in err
    assert "geneval: GenEval detector" in err and "pickscore: PickScore model" in err and "ocr: stand-in" in err
    assert not (root / "runs" / "dry").exists()
