"""A local vision-language model's account of a photo, shown only as far as the model's own outputs back it.

Optional, and sized for a GPU: :class:`VLMExplainer` gives a vision-language model saved in a local folder
(``transformers``' image-text-to-text class, e.g. Qwen2.5-VL-3B-Instruct or -7B-Instruct saved with
``save_pretrained`` or ``hf download``) the photo and the geolocation model's own claims (the template chain of
:func:`geoloc.evidence.verbalize.explain`), and asks for a description in the three stages and the exact
phrasing of the training captions (:mod:`geoloc.evidence.captions`), so that
:func:`geoloc.evidence.claims.parse_text` can read it back into claims.

Its text is trusted only through the checker: every claim it makes is checked against the network outputs
(:func:`geoloc.evidence.claims.checked_chain`), and only those the model backs are shown; the rest are
dropped and counted, however fluent. A VLM that names Sydney for a photo the model places in Paris shows
nothing about Sydney.

Nothing is downloaded: a folder is read with ``local_files_only=True``, and a hub name that is not a folder
is refused. The weights are read on first use (:meth:`VLMExplainer.load`), not when the explainer is made.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from geoloc.evidence.claims import checked_chain, parse_text
from geoloc.evidence.labels import HEADS

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _options(head: str) -> str:
    return " | ".join(HEADS[head])


class VLMExplainer:
    """Asks a local vision-language model to describe photos in the caption phrasing, then checks what it says.

    Args:
        model: a folder holding a saved image-text-to-text model and its processor (``config.json``, the
            weights, ``processor_config.json`` or ``preprocessor_config.json`` and the tokenizer files), or an
            already-built ``transformers`` model (it runs where it is; ``device`` and ``dtype`` apply to a
            folder's model only).
        processor: the model's processor (required with a built model; a folder's own is used otherwise).
        device: where a folder's model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        max_new_tokens: the most tokens generated per photo (the caption takes about 60 of Qwen2.5's).
        dtype: the torch dtype to load a folder's weights in (None: as ``transformers`` chooses).
        name: named in each chain's ``source`` (``"vlm:<name>"``); the folder's name by default.

    Raises:
        ModuleNotFoundError: ``transformers`` is not installed.
        FileNotFoundError: ``model`` is a path with nothing there (a hub name is not downloaded).
        ValueError: the path is not a folder holding a saved model and processor, or a built model comes without
            its processor.
    """

    def __init__(self, model, processor=None, *, device: str = "cpu", max_new_tokens: int = 96, dtype=None,
                 name: str | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.device, self.max_new_tokens, self.dtype = device, int(max_new_tokens), dtype
        self.path: Path | None = None
        if isinstance(model, (str, Path)):
            self.path = Path(model)
            self._check_folder(self.path, need_processor=processor is None)
            self._model = None
            self.name = name or self.path.name
        else:
            if processor is None:
                raise ValueError(f"a built model ({type(model).__name__}) needs its processor: "
                                 "VLMExplainer(model, processor)")
            self._model = model
            self.name = name or Path(str(getattr(getattr(model, "config", None), "name_or_path", "") or
                                         type(model).__name__)).name
        self._processor = processor

    @staticmethod
    def _check_folder(path: Path, *, need_processor: bool) -> None:
        """Refuses, before anything is read, a path that cannot hold a saved model (or a missing transformers)."""
        if importlib.util.find_spec("transformers") is None:
            raise ModuleNotFoundError(
                f"reading the vision-language model at {path} needs the 'transformers' package, which is not "
                "installed; install it with `pip install transformers`.", name="transformers")
        saved = "save one with model.save_pretrained(folder) and processor.save_pretrained(folder)"
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such folder. VLMExplainer reads only a model saved locally and never downloads; "
                f"fetch one first (e.g. `hf download Qwen/Qwen2.5-VL-3B-Instruct --local-dir {path}`) or {saved}")
        if not path.is_dir():
            raise ValueError(f"{path}: not a saved model, it is a file (expected a folder with config.json); {saved}")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a saved model, the folder has no config.json; {saved}")
        if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_FILES):
            raise ValueError(f"{path}: not a saved model, config.json but no weights (*.safetensors or *.bin); "
                             f"{saved}")
        if need_processor and not any((path / f).is_file() for f in _PROCESSOR_FILES):
            raise ValueError(f"{path}: has a model but no processor ({' or '.join(_PROCESSOR_FILES)}); pass one as "
                             "VLMExplainer(path, processor) or save it with processor.save_pretrained(folder)")

    def load(self) -> VLMExplainer:
        """Reads a folder's model and processor (once; a built model is already loaded). Returns self.

        Raises:
            ValueError: ``transformers`` cannot read the folder as an image-text-to-text model and processor.
        """
        if self._model is not None and self._processor is not None:
            return self
        from transformers import AutoModelForImageTextToText, AutoProcessor

        def refuse(what: str, e: Exception) -> ValueError:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return ValueError(f"{self.path}: transformers cannot read its {what} ({type(e).__name__}: {reason})")

        if self._processor is None:
            try:
                self._processor = AutoProcessor.from_pretrained(str(self.path), local_files_only=True)
            except Exception as e:  # transformers raises OSError, ValueError, KeyError or TypeError here
                raise refuse("processor", e) from e
        if self._model is None:
            kwargs = {"local_files_only": True} | ({} if self.dtype is None else {"dtype": self.dtype})
            try:
                model = AutoModelForImageTextToText.from_pretrained(str(self.path), **kwargs)
            except Exception as e:
                raise refuse("model as an image-text-to-text model", e) from e
            self._model = model.to(self.device).eval()
        return self

    @property
    def model(self):
        """The ``transformers`` model (read from the folder on first use)."""
        return self.load()._model

    @property
    def processor(self):
        """The model's processor (read from the folder on first use)."""
        return self.load()._processor

    @staticmethod
    def prompt(template_text: str) -> str:
        """The instructions for one photo: describe it in the caption's three stages and exact phrasing, with the
        geolocation model's own claims (``template_text``, its template chain) as evidence the VLM may use."""
        return (
            "Where was this photo taken? Describe it in three stages, in exactly this form and these words:\n"
            "Scene: <scene>. Environment: <Köppen class> climate, <land cover> land cover, <distance band> from "
            "the coast, traffic on the <left|right>, <script> script. Region: a photo I took close to the town "
            "of <town> in the region of <admin-1 region>, <country>, <continent>.\n"
            f"<scene> is one of: {_options('scene')}.\n"
            f"<Köppen class> is one of: {_options('koppen')}.\n"
            f"<land cover> is one of: {_options('land_cover')}.\n"
            f"<distance band> is one of: {_options('coast')}.\n"
            f"<script> is the script of writing in the photo, one of: {_options('script')}.\n"
            f"<continent> is one of: {_options('continent')}.\n"
            "Name the town and region in English and the country by its full English name (United States of "
            "America, United Kingdom, Czechia, South Korea). Leave out any part you cannot tell; do not guess, and "
            "write nothing else.\n"
            "A geolocation model read the same photo as follows; use it as evidence where the photo agrees:\n"
            f"{template_text.strip()}"
        )

    def _chat(self, prompt: str) -> str:
        """The model's input text for one photo: the processor's chat template, else the image token and prompt."""
        processor = self.processor
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_token = getattr(processor, "image_token", None)
        if not image_token:
            raise ValueError(f"the processor of {self.name} ({type(processor).__name__}) has neither a chat "
                             "template nor an image token, so there is no way to place the photo in the prompt")
        return f"{image_token}\n{prompt}\n"

    def generate(self, images: list, template_texts: list[str]) -> list[str]:
        """The VLM's text for each photo: greedy, at most ``max_new_tokens``, only the new tokens decoded.

        Args:
            images: ``B`` PIL images.
            template_texts: ``B`` template chain texts (``chain["text"]`` of
                :func:`geoloc.evidence.verbalize.explain`), one per photo.
        """
        import torch

        if len(images) != len(template_texts):
            raise ValueError(f"{len(images)} images but {len(template_texts)} template texts; give one per photo")
        if not images:
            return []
        model, processor = self.model, self.processor
        texts = [self._chat(self.prompt(t)) for t in template_texts]
        # left padding: every row's new tokens then start at the same column
        inputs = processor(text=texts, images=[im.convert("RGB") for im in images], padding=True,
                           padding_side="left", return_tensors="pt").to(model.device)
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        new = ids[:, inputs["input_ids"].shape[1]:]
        decode = getattr(processor, "batch_decode", None) or processor.tokenizer.batch_decode
        return [t.strip() for t in decode(new, skip_special_tokens=True)]

    def explain(self, images: list, template_chains: list[dict], out: dict, cells) -> list[dict]:
        """Per photo, the VLM's text parsed into claims and checked against the model's outputs.

        Args:
            images: ``B`` PIL images.
            template_chains: ``B`` chains of :func:`geoloc.evidence.verbalize.explain` (their ``"text"`` is given
                to the VLM as evidence).
            out: the network outputs for the same photos (``cell_prob (B, C)``, ``evidence/<head> (B, K)``).
            cells: the model's :class:`~geoloc.geo.cells.Geocells`.

        Returns:
            Per photo, :func:`geoloc.evidence.claims.checked_chain` (``source`` ``"vlm:<name>"``; only backed
            claims are shown) with ``"seconds"``: the time to generate, parse and check that photo's text.
        """
        if len(images) != len(template_chains):
            raise ValueError(f"{len(images)} images but {len(template_chains)} template chains; give one per photo")
        chains = []
        for i, (image, template) in enumerate(zip(images, template_chains)):
            start = time.perf_counter()
            text = self.generate([image], [template["text"]])[0]
            claims, unparsed = parse_text(text)
            chain = checked_chain(claims, out, i, cells, source=f"vlm:{self.name}", text=text, unparsed=unparsed)
            chains.append({**chain, "seconds": time.perf_counter() - start})
        return chains
