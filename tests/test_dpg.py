"""DPG-Bench scoring: dependency zeroing, tile geometry, categories and the official quirks; the BLIP VQA path."""
import csv

from PIL import Image

from eval.dpg import BlipVQA, Item, load_csv, score_image, summarize, tile_scores


def _item():
    # 1: is there a dog? (root)  2: is the dog brown? (depends on 1)  3: is the dog on the sofa? (depends on 1, 2)
    it = Item("x", {1: "is there a dog?", 2: "is the dog brown?", 3: "is the dog on the sofa?"},
              {1: [0], 2: [1], 3: [1, 2]}, {1: "entity - whole", 2: "attribute - color", 3: "relation - spatial"})
    return it


def test_dependency_zeroing_cascades_in_question_order():
    orig, filt = tile_scores({1: "yes", 2: "no", 3: "yes"}, {1: [0], 2: [1], 3: [1, 2]})
    assert orig == {1: 1.0, 2: 0.0, 3: 1.0} and filt == {1: 1.0, 2: 0.0, 3: 0.0}
    orig, filt = tile_scores({1: "no", 2: "yes", 3: "yes"}, {1: [0], 2: [1], 3: [2]})
    assert filt == {1: 0.0, 2: 0.0, 3: 0.0}          # 3's parent was zeroed in place: the zero cascades
    assert tile_scores({1: "Yes"}, {1: [0]})[1] == {1: 0.0}   # exact "yes" only


def test_tiles_image_score_and_categories():
    R = 8
    img = Image.new("RGB", (2 * R, 2 * R))
    for k, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        img.paste(Image.new("RGB", (R, R), color), ((k % 2) * R, (k // 2) * R))
    # scripted VQA: answers depend on the tile's colour (checks the crop boxes (0,0,R,R), (R,0,2R,R), ...)
    script = {(255, 0, 0): {1: "yes", 2: "yes", 3: "yes"}, (0, 255, 0): {1: "yes", 2: "no", 3: "yes"},
              (0, 0, 255): {1: "no", 2: "yes", 3: "yes"}, (255, 255, 255): {1: "yes", 2: "yes", 3: "no"}}
    qs = _item().questions
    vqa = lambda tile, q: script[tile.getpixel((0, 0))][next(k for k, v in qs.items() if v == q)]  # noqa: E731
    s, tiles = score_image(img, _item(), vqa)
    assert [sum(t[1].values()) / 3 for t in tiles] == [1.0, 1 / 3, 0.0, 2 / 3]
    assert abs(s - (1 + 1 / 3 + 0 + 2 / 3) / 4) < 1e-12
    off = summarize([(_item(), s, tiles)], official_quirks=True)      # last tile, before zeroing
    assert off["dpg_overall"] == 100 * s
    assert off["dpg_relation"] == 0.0 and off["dpg_entity"] == 100.0 and off["dpg_attribute/color"] == 100.0
    fixed = summarize([(_item(), s, tiles)], official_quirks=False)  # all tiles, after zeroing
    assert fixed["dpg_entity"] == 75.0 and fixed["dpg_relation"] == 25.0


def test_csv_loader_and_first_row_quirk(tmp_path):
    p = tmp_path / "dpg_bench.csv"
    cols = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
            "tuple", "question_natural_language"]
    rows = [["a", "t", "", "1", "0", "", "", "entity - whole (dog)", "is there a dog?"],
            ["a", "t", "", "2", "1", "", "", "attribute - color (dog, brown)", "is the dog brown?"],
            ["b", "t", "", "1", "0", "", "", "global - (photo)", "is this a photo?"]]
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    official = load_csv(p, True)
    assert list(official["a"].questions) == [2] and official["a"].dependency[2] == [1]
    full = load_csv(p, False)
    assert list(full["a"].questions) == [1, 2] and full["b"].category[1] == "global -"


def test_blip_vqa_backend_runs_on_a_tiny_random_model(tmp_path):
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipProcessor

    try:
        from transformers import BlipImageProcessorPil as ImageProc
    except ImportError:  # older transformers
        from transformers import BlipImageProcessor as ImageProc
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "is", "there", "a", "dog", "?"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    proc = BlipProcessor(image_processor=ImageProc(size={"height": 32, "width": 32}),
                         tokenizer=BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")))
    cfg = BlipConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, bos_token_id=2, sep_token_id=3,
                                      pad_token_id=0),
                     vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8))
    torch.manual_seed(0)
    vqa = BlipVQA("", model=BlipForQuestionAnswering(cfg), processor=proc)
    a = vqa(Image.new("RGB", (64, 64)), "is there a dog?")
    assert isinstance(a, str) and a == vqa(Image.new("RGB", (64, 64)), "is there a dog?")


def test_score_stage_on_an_external_folder_reports_missing_inputs_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "imgs").mkdir()
    env = dict(os.environ, VARBENCH_RESULTS=str(tmp_path / "res"), VARBENCH_DATA=str(tmp_path / "data"))
    r = subprocess.run([sys.executable, "run.py", "bench=dpg", "stage=score", f"score_dir={tmp_path / 'imgs'}"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "dpg_bench.csv" in lines[0] and "fetch_benchmarks.py dpg_bench" in lines[0]
