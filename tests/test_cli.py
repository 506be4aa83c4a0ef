"""The study CLI end to end on a tiny random model directory, resumability, and clear errors on bad
input before any long work."""
import json

import pytest
import torch

from sdft_kernels.cli import main
from sdft_kernels.io import read_json, save_model_dir
from sdft_kernels.models import tiny_random_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    model, tok = tiny_random_model(num_layers=2, hidden_size=32, seed=0)
    save_model_dir(model, tok, d)
    return d


def test_run_quick_end_to_end_and_resume(tiny_dir, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["run", "--quick", "--model", str(tiny_dir), "--out", str(out), "--no-progress",
                 "--specs", "rtn:2", "blocks:1"]) == 0
    for f in ("config.json", "metrics.json", "metrics.csv", "report.md", "cka_per_layer.png",
              "cka_trajectory.png", "heatmap_rtn-2.png"):
        assert (out / f).is_file(), f
    m = read_json(out / "metrics.json")
    assert [r["run"] for r in m["runs"]] == ["rtn-2", "blocks-1"]
    assert m["teacher"]["self_cka"] == pytest.approx([1.0, 1.0], abs=1e-6)
    blocks = read_json(out / "units" / "blocks-1" / "result.json")
    assert len(blocks["before"]["align"]["cka"]) == 1 and blocks["structure_kept"]["decoder_layers"] == 1
    assert read_json(out / "units" / "rtn-2" / "result.json")["structure_kept"]["quant_layers"] > 0
    report = (out / "report.md").read_text()
    assert "## Quantization" in report and "## Block removal" in report
    # rerun: every unit is reused, nothing recomputed (result files untouched)
    stamp = (out / "units" / "rtn-2" / "result.json").stat().st_mtime_ns
    assert main(["run", "--quick", "--model", str(tiny_dir), "--out", str(out), "--no-progress",
                 "--specs", "rtn:2", "blocks:1"]) == 0
    assert (out / "units" / "rtn-2" / "result.json").stat().st_mtime_ns == stamp


def test_degrade_align_eval_recover_commands(tiny_dir, tmp_path, capsys):
    deg = tmp_path / "deg"
    assert main(["degrade", "--model", str(tiny_dir), "--spec", "rtn:3:g16", "--out", str(deg),
                 "--block-len", "32", "--calib-blocks", "2"]) == 0
    assert read_json(deg / "degradation.json")["params"]["bits"] == 3
    capsys.readouterr()
    assert main(["align", "--teacher", str(tiny_dir), "--student", str(deg), "--block-len", "48",
                 "--blocks", "1", "--out", str(tmp_path / "a.json")]) == 0
    a = read_json(tmp_path / "a.json")
    assert len(a["cka"]) == 2 and 0 < a["mean_cka"] <= 1 + 1e-9
    assert main(["eval", "--model", str(deg), "--tokens", "96", "--window", "32", "--stride", "32",
                 "--task-examples", "2", "--out", str(tmp_path / "e.json")]) == 0
    assert read_json(tmp_path / "e.json")["perplexity"] > 1
    rec = tmp_path / "rec"
    assert main(["recover", "--teacher", str(tiny_dir), "--student", str(deg), "--out", str(rec),
                 "--steps", "2", "--batch-size", "2", "--block-len", "32", "--max-blocks", "8",
                 "--checkpoint-every", "1"]) == 0
    s = read_json(rec / "summary.json")
    assert s["steps"] == 2 and (rec / "model" / "sdft_state.pt").is_file()
    assert len((rec / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("argv, msg", [
    (["degrade", "--spec", "rtn:5", "--out", "X"], "bits must be one of"),
    (["degrade", "--spec", "wanda:1.5", "--out", "X"], "sparsity must be in"),
    (["degrade", "--spec", "blocks:0", "--out", "X"], "positive integer"),
    (["degrade", "--spec", "blur:3", "--out", "X"], "unknown kind"),
    (["run", "--specs", "rtn:3:g0"], "unknown option"),
    (["degrade", "--spec", "forget:inf", "--out", "X"], "finite"),
    (["degrade", "--spec", "blocks:nan", "--out", "X"], "finite"),
])
def test_bad_severity_is_a_clear_error(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_bad_model_and_text(tiny_dir, tmp_path, capsys):
    not_lm = tmp_path / "not_lm"
    not_lm.mkdir()
    (not_lm / "notes.txt").write_text("hello")
    assert main(["eval", "--model", str(not_lm)]) == 2
    assert str(not_lm) in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["eval", "--model", str(tiny_dir), "--text", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["degrade", "--model", str(tiny_dir), "--spec", "blocks:2", "--out", str(tmp_path / "x")]) == 2
    assert "at most 1" in capsys.readouterr().err
    # --out must not replace a directory of other files (it was deleted whole) or a file
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "thesis.tex").write_text("years of work")
    plain = tmp_path / "plain.txt"
    plain.write_text("data")
    for out in (keep, plain):
        assert main(["degrade", "--model", str(tiny_dir), "--spec", "rtn:4", "--out", str(out)]) == 2
        assert "--out" in capsys.readouterr().err
    assert (keep / "thesis.tex").read_text() == "years of work" and plain.read_text() == "data"
    assert main(["align", "--teacher", str(tiny_dir), "--student", str(tiny_dir), "--block-len", "0"]) == 2
    assert "--block-len" in capsys.readouterr().err


def test_tokenizer_mismatch_and_unmappable_layers(tiny_dir, tmp_path, capsys):
    other, tok = tiny_random_model(num_layers=3, hidden_size=32, seed=1)
    save_model_dir(other, tok, tmp_path / "three")  # 3 layers, no record: cannot map onto 2
    assert main(["align", "--teacher", str(tiny_dir), "--student", str(tmp_path / "three")]) == 2
    assert "layer_map" in capsys.readouterr().err
    small, tok = tiny_random_model(num_layers=2, hidden_size=32, seed=2)
    small.resize_token_embeddings(200)
    save_model_dir(small, tok, tmp_path / "vocab")
    assert main(["align", "--teacher", str(tiny_dir), "--student", str(tmp_path / "vocab")]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_degrading_a_degraded_model_composes_the_layer_map(tiny_dir, tmp_path, capsys):
    from sdft_kernels.io import read_json
    a, b, p = tmp_path / "a", tmp_path / "b", tmp_path / "p"
    assert main(["degrade", "--model", str(tiny_dir), "--spec", "blocks:1", "--calib-blocks", "1",
                 "--block-len", "32", "--out", str(a)]) == 0
    first = read_json(a / "degradation.json")["layer_map"]
    assert main(["degrade", "--model", str(a), "--spec", "rtn:4", "--out", str(b)]) == 0
    rec = read_json(b / "degradation.json")
    assert rec["layer_map"] == first and rec["previous"]["kind"] == "prune_blocks"  # was reset to [0]
    assert main(["degrade", "--model", str(tiny_dir), "--spec", "magnitude:0.5", "--out", str(p)]) == 0
    capsys.readouterr()
    assert main(["degrade", "--model", str(p), "--spec", "rtn:4", "--out", str(tmp_path / "q")]) == 2
    assert "already degraded" in capsys.readouterr().err  # was a deepcopy traceback


@pytest.mark.parametrize("cmd", ["run", "degrade", "align", "eval", "recover"])
@pytest.mark.parametrize("dev, msg", [("tpu", "expected auto, cpu, cuda or cuda:N"),
                                      ("cuda:x", "expected auto, cpu, cuda or cuda:N")]
                         + ([] if torch.cuda.is_available() else [("cuda", "sees no CUDA device")]))
def test_bad_device_is_refused_before_any_work(cmd, dev, msg, tmp_path, capsys):
    required = {"run": ["--out", str(tmp_path / "o")], "degrade": ["--spec", "rtn:4", "--out", str(tmp_path / "o")],
                "align": ["--student", "S"], "eval": [], "recover": ["--student", "S", "--out", str(tmp_path / "o")]}
    assert main([cmd, *required[cmd], "--device", dev]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and msg in err
    assert not (tmp_path / "o").exists()


def test_saved_compressed_state_holds_no_device_tensors(tiny_dir, tmp_path):
    from sdft_kernels.degrade.quantize import quantize_rtn
    from sdft_kernels.io import load_model_dir
    model = load_model_dir(tiny_dir)[0]
    q, record = quantize_rtn(model, 4, group_size=16)
    save_model_dir(q, None, tmp_path / "q", record)
    sd = torch.load(tmp_path / "q" / "sdft_state.pt", weights_only=False)["state_dict"]
    assert sd and all(v.device.type == "cpu" for v in sd.values())


@pytest.mark.cuda
def test_commands_on_cuda_match_cpu(tiny_dir, tmp_path, capsys):
    """degrade -> align -> eval -> recover with --device cuda: the same numbers as on the CPU (float
    rounding apart), and saved models that load without a GPU."""
    res = {}
    for dev in ("cpu", "cuda"):
        d = tmp_path / dev
        assert main(["degrade", "--model", str(tiny_dir), "--spec", "gptq:3:g16", "--out", str(d / "deg"),
                     "--block-len", "32", "--calib-blocks", "2", "--device", dev]) == 0
        assert main(["align", "--teacher", str(tiny_dir), "--student", str(d / "deg"), "--block-len", "48",
                     "--blocks", "1", "--out", str(d / "a.json"), "--device", dev]) == 0
        assert main(["eval", "--model", str(d / "deg"), "--tokens", "96", "--window", "32", "--stride", "32",
                     "--task-examples", "0", "--out", str(d / "e.json"), "--device", dev]) == 0
        assert main(["recover", "--teacher", str(tiny_dir), "--student", str(d / "deg"), "--out", str(d / "rec"),
                     "--steps", "2", "--batch-size", "2", "--block-len", "32", "--max-blocks", "8",
                     "--device", dev]) == 0
        res[dev] = (read_json(d / "a.json"), read_json(d / "e.json"), read_json(d / "rec" / "summary.json"))
    capsys.readouterr()
    (a0, e0, s0), (a1, e1, s1) = res["cpu"], res["cuda"]
    assert a1["cka"] == pytest.approx(a0["cka"], abs=1e-4)
    assert e1["perplexity"] == pytest.approx(e0["perplexity"], rel=1e-3)
    assert s1["steps"] == s0["steps"] == 2
    sd = torch.load(tmp_path / "cuda" / "rec" / "model" / "sdft_state.pt", weights_only=False)["state_dict"]
    assert all(v.device.type == "cpu" for v in sd.values())


@pytest.mark.cuda
def test_quick_study_on_cuda(tiny_dir, tmp_path):
    out = tmp_path / "study"
    assert main(["run", "--quick", "--model", str(tiny_dir), "--out", str(out), "--no-progress",
                 "--specs", "rtn:2", "forget:4", "--device", "cuda"]) == 0
    m = read_json(out / "metrics.json")
    assert m["device"].endswith("(cuda)") and m["teacher"]["self_cka"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert "run on " in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def short_dirs(tmp_path_factory):
    """GPT-2 directories with 48 positions (too short for the narrow task) and 100 (enough for it, shorter
    than the default 256-token windows)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    _, tok = tiny_random_model(num_layers=1, hidden_size=16)
    out = {}
    for n in (48, 100):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(f"ctx{n}") / "model"
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=n)).save_pretrained(d)
        tok.save_pretrained(d)
        out[n] = d
    return out


def test_windows_fit_a_short_context_model(short_dirs, tmp_path, capsys):
    """Default windows shrink to the model's context; a given one longer than it is refused naming its
    option (before: an IndexError inside the position embedding, mid-run)."""
    short, ctx100 = short_dirs[48], short_dirs[100]
    assert main(["degrade", "--model", str(short), "--spec", "gptq:4", "--out", str(tmp_path / "g"),
                 "--calib-blocks", "2"]) == 0
    capsys.readouterr()
    for argv, flag in ((["degrade", "--model", str(short), "--spec", "wanda:0.5", "--out", str(tmp_path / "w"),
                         "--block-len", "49"], "--block-len"),
                       (["eval", "--model", str(short), "--window", "64", "--task-examples", "0"], "--window"),
                       (["recover", "--teacher", str(short), "--student", str(tmp_path / "g"), "--out",
                         str(tmp_path / "r"), "--block-len", "64"], "--block-len")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag}: " in err and "context of 48" in err, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
    assert main(["eval", "--model", str(short), "--tokens", "200", "--task-examples", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    # the narrow task's prompt and answer do not fit 48 positions: refused before any scoring or study unit
    assert main(["eval", "--model", str(short), "--task-examples", "2"]) == 2
    assert "context of 48 tokens cannot hold a prompt" in capsys.readouterr().err
    assert main(["run", "--quick", "--model", str(short), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert not (tmp_path / "s" / "units").exists()
    assert main(["run", "--quick", "--model", str(ctx100), "--out", str(tmp_path / "s100"), "--no-progress",
                 "--specs", "rtn:2"]) == 0
    assert read_json(tmp_path / "s100" / "config.json")["align_block_len"] == 100


def test_eval_and_align_in_bfloat16_match_float32(tiny_dir, tmp_path, capsys):
    deg = tmp_path / "deg"
    assert main(["degrade", "--model", str(tiny_dir), "--spec", "rtn:3:g16", "--out", str(deg)]) == 0
    res = {}
    for dt in ("float32", "bfloat16"):
        capsys.readouterr()
        assert main(["eval", "--model", str(deg), "--tokens", "512", "--task-examples", "0", "--dtype", dt]) == 0
        ev = json.loads(capsys.readouterr().out)
        assert main(["align", "--teacher", str(tiny_dir), "--student", str(deg), "--block-len", "128",
                     "--blocks", "1", "--no-heatmap", "--dtype", dt]) == 0
        al = json.loads(capsys.readouterr().out)
        assert ev["dtype"] == al["dtype"] == dt
        res[dt] = (ev["perplexity"], al["cka"])
    (p32, c32), (p16, c16) = res["float32"], res["bfloat16"]
    assert p16 == pytest.approx(p32, rel=0.02) and p16 != p32
    assert c16 == pytest.approx(c32, abs=0.01)
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["eval", "--model", str(deg), "--dtype", "float64"])
    assert "--dtype: invalid choice" in capsys.readouterr().err


def test_layer_map_option_pairs_models_of_different_depth(tiny_dir, tmp_path, capsys):
    from sdft_kernels.commands.common import uniform_layer_map
    assert uniform_layer_map(2, 6) == [2, 5] and uniform_layer_map(3, 3) == [0, 1, 2] and uniform_layer_map(1, 4) == [3]
    shallow = tmp_path / "shallow"  # another model, one block, no degradation record
    model, tok = tiny_random_model(num_layers=1, hidden_size=32, seed=3)
    save_model_dir(model, tok, shallow)
    args = ["align", "--teacher", str(tiny_dir), "--student", str(shallow), "--block-len", "64", "--blocks", "1",
            "--no-heatmap"]
    assert main(args) == 2
    assert "--layer-map sets it" in capsys.readouterr().err
    for lm, want in (("uniform", [1]), ("0", [0])):
        assert main(args + ["--layer-map", lm]) == 0
        assert json.loads(capsys.readouterr().out)["layer_map"] == want
    for bad, msg in (("0,1", "one teacher index per student layer"), ("7", "must be in [0, 2)"), ("a", "comma-separated")):
        assert main(args + ["--layer-map", bad]) == 2
        assert msg in capsys.readouterr().err
    rec = tmp_path / "rec"
    assert main(["recover", "--teacher", str(tiny_dir), "--student", str(shallow), "--out", str(rec), "--steps", "1",
                 "--batch-size", "2", "--block-len", "32", "--max-blocks", "4", "--layer-map", "uniform"]) == 0
    assert read_json(rec / "model" / "degradation.json")["layer_map"] == [1]
