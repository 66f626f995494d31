"""A vision-language model's text is shown only as far as the model's outputs back it (geoloc.evidence.vlm).

Offline: the VLM is a tiny randomly initialised Qwen2.5-VL (the real class, a 32-wide single layer) with a word-level
tokenizer built here, saved to a folder and read back as a real one would be. Its text is nonsense; the checker
must keep only what the outputs back.
"""

import re

import numpy as np
import pytest
from PIL import Image

from geoloc.evidence.claims import verify_checked_chain
from geoloc.evidence.labels import HEADS
from geoloc.evidence.vlm import VLMExplainer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WRONG = ("Scene: urban. Environment: Cfb climate, traffic on the left, Latin script. Region: a photo I took close "
         "to the town of Sydney in the region of New South Wales, Australia, Oceania.")


@pytest.fixture(scope="module")
def cells():
    """Real geocells (the project's boundaries and cell evidence) from photos around Paris and Sydney."""
    from geocells.boundaries import load_boundaries
    from geocells.build import add_cell_evidence, build_geocells
    from geoloc.geo.cells import Geocells

    rng = np.random.default_rng(0)
    paris = np.column_stack([rng.normal(48.85, 0.2, 60), rng.normal(2.35, 0.3, 60)])
    sydney = np.column_stack([rng.normal(-33.87, 0.2, 60), rng.normal(151.0, 0.2, 60)])
    pts = np.vstack([paris, sydney])
    table, _ = build_geocells(pts, load_boundaries(), min_points=20, max_points=200)
    return Geocells(add_cell_evidence(table, pts))


def _confident(head: str, value: str, p: float) -> np.ndarray:
    probs = np.full((1, len(HEADS[head])), (1 - p) / (len(HEADS[head]) - 1))
    probs[0, HEADS[head].index(value)] = p
    return probs


@pytest.fixture(scope="module")
def out(cells):
    """Network outputs for one photo the model puts in France: urban, traffic on the right, Latin script."""
    france = np.flatnonzero(cells.table["country"].to_numpy() == "France")
    assert len(france) and (cells.table["country"] == "Australia").any()
    cell_prob = np.zeros((1, len(cells)))
    cell_prob[0, france] = 1 / len(france)
    return {"cell_prob": cell_prob, "evidence/scene": _confident("scene", "urban", 0.9),
            "evidence/driving_side": _confident("driving_side", "right", 0.98),
            "evidence/script": _confident("script", "Latin", 0.9)}


@pytest.fixture(scope="module")
def template_chains(out, cells):
    """The model's own chain (the VLM's evidence), as the predictor writes it."""
    from geoloc.evidence.verbalize import explain
    from geoloc.inference.base import Prediction

    top = np.argsort(-out["cell_prob"], axis=1)[:, :2]
    pred = Prediction(latlng=cells.centroids[top[:, 0]], topk_cells=top,
                      topk_prob=np.take_along_axis(out["cell_prob"], top, 1))
    return explain(out, pred, cells)


def _photo(seed: int = 0, size=(112, 84)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, template_chains):
    """A folder holding a tiny random Qwen2.5-VL and its processor, saved as a downloaded model is."""
    pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # the words of the prompt and of the captions: the random text is then made of caption words, some of which
    # the parser reads as claims
    words = VLMExplainer.prompt(template_chains[0]["text"]).split() + WRONG.split() + ["France", "Europe", "Paris"]
    pre = pre_tokenizers.Whitespace()
    vocab = {t: i for i, t in enumerate(SPECIAL + ["[UNK]"])}
    for w in words:
        for piece, _ in pre.pre_tokenize_str(w):
            vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", additional_special_tokens=SPECIAL[1:])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        video_processor=Qwen2VLVideoProcessor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
                     "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _faithful(chain, out, cells):
    assert verify_checked_chain(chain, out, 0, cells) == []
    backed = [c["verdict"] == "backed" for c in chain["claims"]]
    shown = {k for s in chain["stages"] for k in s["claims"]}
    assert all(backed[k] for k in shown) and len(shown) == chain["kept"] == sum(backed)
    assert sum(chain["dropped"].values()) == len(backed) - sum(backed)  # every claim not shown is counted


@pytest.mark.slow
def test_a_random_vlms_nonsense_is_checked_and_only_what_the_outputs_back_is_shown(tiny_vlm, out, cells,
                                                                                   template_chains):
    explainer = VLMExplainer(str(tiny_vlm), max_new_tokens=40)
    assert explainer._model is None  # the weights are read on first use, not when the explainer is made
    (chain,) = explainer.explain([_photo()], template_chains, out, cells)
    assert isinstance(chain["generated_text"], str) and chain["generated_text"]
    assert chain["source"] == f"vlm:{tiny_vlm.name}" and chain["seconds"] > 0
    assert chain["unparsed"] + len(chain["claims"]) >= 1  # the text was read
    _faithful(chain, out, cells)
    # greedy: the same photo gives the same text
    assert explainer.generate([_photo()], [template_chains[0]["text"]]) == [chain["generated_text"]]


@pytest.mark.slow
def test_photos_generated_together_get_the_text_each_gets_alone(tiny_vlm, template_chains):
    """Left padding: a batch of photos of different sizes and prompts decodes each one's own new tokens."""
    explainer = VLMExplainer(str(tiny_vlm), max_new_tokens=24)
    images = [_photo(1, (112, 84)), _photo(2, (84, 140))]
    texts = [template_chains[0]["text"], "Region: France, Europe."]
    alone = [explainer.generate([im], [t])[0] for im, t in zip(images, texts)]
    assert explainer.generate(images, texts) == alone
    with pytest.raises(ValueError, match="2 images but 1 template texts"):
        explainer.generate(images, texts[:1])


@pytest.mark.slow
def test_a_built_model_without_a_chat_template_gets_the_image_token_and_the_prompt(tiny_vlm, out, cells,
                                                                                    template_chains):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm, local_files_only=True)
    processor.chat_template = None
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, local_files_only=True)
    explainer = VLMExplainer(model, processor, max_new_tokens=16, name="tiny")
    assert explainer._chat("Scene?").startswith("<|image_pad|>\nScene?")
    (chain,) = explainer.explain([_photo()], template_chains, out, cells)
    assert chain["source"] == "vlm:tiny" and isinstance(chain["generated_text"], str)
    _faithful(chain, out, cells)
    with pytest.raises(ValueError, match="needs its processor"):
        VLMExplainer(model)


class _ConfidentlyWrong(VLMExplainer):
    """A VLM that writes a fluent chain naming Sydney, whatever the photo."""

    def generate(self, images, template_texts):
        return [WRONG] * len(images)


@pytest.mark.slow  # the geocells fixture reads the boundaries and the climate and land cover rasters
def test_a_confident_wrong_chain_is_dropped_and_what_the_outputs_back_is_kept(out, cells, template_chains):
    explainer = _ConfidentlyWrong(object(), processor=object(), name="confident")  # generate never runs a model
    (chain,) = explainer.explain([_photo()], template_chains, out, cells)
    verdicts = {c["head"]: (c["value"], c["verdict"]) for c in chain["claims"]}
    assert verdicts == {
        "scene": ("urban", "backed"), "koppen": ("Cfb", "backed"), "script": ("Latin", "backed"),  # Paris is Cfb
        "driving_side": ("left", "contradicted"), "place": ("Sydney (2147714)", "contradicted"),
        "admin1": ("New South Wales, Australia", "contradicted"), "country": ("Australia", "contradicted"),
        "continent": ("Oceania", "contradicted")}
    assert chain["kept"] == 3 and chain["unparsed"] == 0
    assert chain["dropped"]["contradicted"] == sum(chain["dropped"].values()) == 5
    shown = " ".join(s["text"] for s in chain["stages"])
    assert [s["stage"] for s in chain["stages"]] == ["scene", "environment"]  # nothing of the region holds
    assert "Cfb climate" in shown and "Latin script" in shown
    for wrong in ("Sydney", "New South Wales", "Australia", "Oceania", "left"):
        assert wrong not in shown
    assert "5 contradicted" in chain["text"]
    _faithful(chain, out, cells)
    with pytest.raises(ValueError, match="1 images but 2 template chains"):
        explainer.explain([_photo()], template_chains * 2, out, cells)


def test_a_folder_without_a_saved_model_is_refused_naming_it(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    here = re.escape(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{here}/nowhere: no such folder.*never downloads"):
        VLMExplainer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen2.5-VL-3B-Instruct: no such folder"):
        VLMExplainer("Qwen/Qwen2.5-VL-3B-Instruct")  # a hub name is not fetched
    with pytest.raises(ValueError, match=rf"{here}: not a saved model, the folder has no config.json"):
        VLMExplainer(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"{here}: not a saved model, config.json but no weights"):
        VLMExplainer(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match=rf"{here}: has a model but no processor"):
        VLMExplainer(tmp_path)
    (tmp_path / "processor_config.json").write_text("{not json")
    explainer = VLMExplainer(tmp_path)  # nothing is read yet
    with pytest.raises(ValueError, match=rf"{here}: transformers cannot read its processor"):
        explainer.load()
    with pytest.raises(ValueError, match=rf"{here}/config.json: not a saved model, it is a file"):
        VLMExplainer(tmp_path / "config.json")

    import geoloc.evidence.vlm as vlm

    real = vlm.importlib.util.find_spec
    monkeypatch.setattr(vlm.importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=rf"model at {here} needs the 'transformers' package"):
        VLMExplainer(tmp_path)


@pytest.mark.slow
def test_the_predictor_adds_the_vlms_checked_chain(tiny_vlm, tiny_text_run):
    """``--vlm``: each photo's explanation gets the VLM's chain, every claim checked against that photo's outputs."""
    from geoloc.inference.predictor import build_predictor

    from .test_verbalize import _photos

    pred = build_predictor(str(tiny_text_run["ckpt"]), explain=True, topk=3, vlm=str(tiny_vlm))
    images, keys = _photos(tiny_text_run, 2)
    res = pred.predict(images, keys)
    out = pred.forward(images)
    assert pred.describe()["vlm"] == tiny_vlm.name
    for i, chain in enumerate(res.explanations):
        assert {"stages", "generated", "vlm"} <= set(chain) and "checked against the model" in chain["text"]
        assert verify_checked_chain(chain["vlm"], out, i, pred.cells) == []
