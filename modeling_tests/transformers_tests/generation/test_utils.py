"""Stand-in for transformers' ``tests/generation/test_utils.py``: a ``GenerationTesterMixin`` written for this project.

Not transformers' file. The transformers 5.25.0 sdist ships ``tests/test_modeling_common.py`` but not
``tests/generation/``, and ``test_modeling_common.py`` imports ``GenerationTesterMixin`` from here. This mixin checks
the same contract of ``GenerationMixin.generate`` (transformers 5.25, ``generation/utils.py``) that transformers'
generation tests check, for decoder-only models, and where it can it checks against an independent oracle rather than
shapes only: greedy search equals an argmax loop over full forwards, a cached generate equals an uncached one,
the hidden states ``generate`` returns equal those of a plain forward, left padding does not change the next token.

A test class provides ``model_tester`` (``prepare_config_and_inputs_for_common()``), ``all_model_classes``
(those with ``can_generate()`` are tested) and may override ``_check_cache_for_generate`` to check its cache layout.
"""

from __future__ import annotations

import copy
import inspect
import unittest

import torch

from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.testing_utils import torch_device


class GenerationTesterMixin:
    """``generate()`` checks for decoder-only causal LMs (greedy, sampling, beam search, caches, padding, embeds)."""

    model_tester = None
    max_new_tokens = 3
    input_name = "input_ids"

    # --- helpers -------------------------------------------------------------------------------------------------

    @property
    def all_generative_model_classes(self):
        return tuple(cls for cls in self.all_model_classes if cls.can_generate())

    def prepare_config_and_inputs_for_generate(self, batch_size: int = 2):
        """Config with no EOS (so every test generates exactly ``max_new_tokens``) and inputs cut to ``batch_size``."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = {
            k: v[:batch_size] if isinstance(v, torch.Tensor) else v
            for k, v in inputs_dict.items()
            if k in ("input_ids", "attention_mask")
        }
        if config.eos_token_id is not None and getattr(config, "pad_token_id", None) is None:
            eos = config.eos_token_id
            config.pad_token_id = eos if isinstance(eos, int) else eos[0]
        config.eos_token_id = None
        return config, inputs

    def _model(self, model_class, config):
        model = model_class(copy.deepcopy(config)).to(torch_device).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = model.config.pad_token_id
        return model

    def _generate(self, model, inputs, **kwargs):
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        kwargs.setdefault("do_sample", False)
        with torch.no_grad():
            return model.generate(**inputs, **kwargs)

    def _check_similar_generate_outputs(self, out, ref, atol=1e-5, msg=""):
        """Same sequences, or, where a token differs, the scores up to that step agree within ``atol`` (a near tie
        broken differently by a batched verification step, as transformers' own generation tests allow)."""
        if torch.equal(out.sequences, ref.sequences):
            return
        prompt = ref.sequences.shape[1] - len(ref.scores)
        for row in range(ref.sequences.shape[0]):
            differs = (out.sequences[row] != ref.sequences[row]).nonzero()
            if len(differs):
                step = int(differs[0]) - prompt
                torch.testing.assert_close(out.scores[step][row], ref.scores[step][row], atol=atol, rtol=atol,
                                           msg=lambda m: f"{msg}: {out.sequences} != {ref.sequences}\n{m}")

    def _check_cache_for_generate(self, batch_size: int, cache, seq_length: int, config) -> None:
        """The cache ``generate`` returns is a transformers ``Cache`` holding ``seq_length`` tokens per row."""
        self.assertIsInstance(cache, Cache, f"generate returned a {type(cache).__name__}, not a transformers Cache")
        self.assertEqual(cache.get_seq_length(), seq_length)

    # --- tests ---------------------------------------------------------------------------------------------------

    def test_inherits_generation_mixin(self):
        for model_class in self.all_generative_model_classes:
            self.assertTrue(issubclass(model_class, GenerationMixin))

    def test_greedy_generate_matches_argmax_loop(self):
        """Greedy ``generate`` (cached and uncached) equals repeated argmax over full, uncached forwards."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            with torch.no_grad():
                for _ in range(self.max_new_tokens):
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
                    ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            for use_cache in (True, False):
                out = self._generate(model, inputs, use_cache=use_cache)
                self.assertTrue(torch.equal(out, ids), f"{model_class.__name__} use_cache={use_cache}: {out} != {ids}")

    def test_greedy_generate_dict_outputs(self):
        """``return_dict_in_generate`` returns one score / logits row per new token, the cache, and hidden states
        whose first step equals a plain forward's."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            batch, prompt_len = inputs["input_ids"].shape
            for use_cache in (True, False):
                out = self._generate(model, inputs, use_cache=use_cache, return_dict_in_generate=True,
                                     output_scores=True, output_logits=True, output_hidden_states=True)
                self.assertEqual(out.sequences.shape, (batch, prompt_len + self.max_new_tokens))
                self.assertEqual(len(out.scores), self.max_new_tokens)
                self.assertEqual(len(out.logits), self.max_new_tokens)
                self.assertEqual(out.logits[0].shape, (batch, config.vocab_size))
                with torch.no_grad():
                    ref = model(**inputs, output_hidden_states=True, use_cache=False)
                self.assertEqual(len(out.hidden_states), self.max_new_tokens)
                self.assertEqual(len(out.hidden_states[0]), len(ref.hidden_states))
                for got, want in zip(out.hidden_states[0], ref.hidden_states):
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(out.logits[0], ref.logits[:, -1].float(), atol=1e-5, rtol=1e-5)
                if use_cache:
                    # the last token is produced, not yet fed: the cache holds everything before it
                    self._check_cache_for_generate(batch, out.cache, out.sequences.shape[1] - 1, model.config)
                    self.assertEqual(out.hidden_states[1][0].shape[1], 1, "a cached step feeds one token")

    def test_greedy_generate_dict_outputs_attentions(self):
        """With eager attention, ``output_attentions`` in ``generate`` returns per step the maps a forward returns."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").to(torch_device).eval()
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = model.config.pad_token_id
            out = self._generate(model, inputs, return_dict_in_generate=True, output_attentions=True)
            with torch.no_grad():
                ref = model(**inputs, output_attentions=True, use_cache=False)
            self.assertEqual(len(out.attentions), self.max_new_tokens)
            self.assertEqual(len(out.attentions[0]), len(ref.attentions))
            for got, want in zip(out.attentions[0], ref.attentions):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    def test_sample_generate(self):
        """Sampling is reproducible under a seed and returns ``num_return_sequences`` rows per prompt."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            outs = []
            for _ in range(2):
                torch.manual_seed(0)
                outs.append(self._generate(model, inputs, do_sample=True, top_k=10, temperature=0.7,
                                           num_return_sequences=2))
            batch, prompt_len = inputs["input_ids"].shape
            self.assertEqual(outs[0].shape, (2 * batch, prompt_len + self.max_new_tokens))
            self.assertTrue(torch.equal(outs[0], outs[1]))

    def test_beam_search_generate(self):
        """Beam search with and without the cache agree (the cache is reordered between beams), scores included."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            batch, prompt_len = inputs["input_ids"].shape
            results = {}
            for use_cache in (True, False):
                results[use_cache] = self._generate(
                    model, inputs, num_beams=3, num_return_sequences=2, length_penalty=2.0, early_stopping=False,
                    use_cache=use_cache, return_dict_in_generate=True, output_scores=True,
                )
            out = results[True]
            self.assertEqual(out.sequences.shape, (2 * batch, prompt_len + self.max_new_tokens))
            self.assertEqual(out.sequences_scores.shape, (2 * batch,))
            self.assertTrue(torch.equal(out.sequences, results[False].sequences))
            torch.testing.assert_close(out.sequences_scores, results[False].sequences_scores, atol=1e-4, rtol=1e-4)

    def test_beam_sample_generate(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            outs = []
            for _ in range(2):
                torch.manual_seed(0)
                outs.append(self._generate(model, inputs, do_sample=True, num_beams=2, top_k=10))
            batch, prompt_len = inputs["input_ids"].shape
            self.assertEqual(outs[0].shape, (batch, prompt_len + self.max_new_tokens))
            self.assertTrue(torch.equal(outs[0], outs[1]))

    def test_left_padding_compatibility(self):
        """Left padding (pad tokens masked out) leaves the last position's logits unchanged."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            ids = inputs["input_ids"]
            mask = torch.ones_like(ids)
            pad = torch.full((ids.shape[0], 4), config.pad_token_id or 0, dtype=ids.dtype, device=ids.device)
            padded_ids = torch.cat([pad, ids], dim=1)
            padded_mask = torch.cat([torch.zeros_like(pad), mask], dim=1)
            padded_ids[0, 2:4], padded_mask[0, 2:4] = 5, 1  # row 0: two more real tokens, so the rows' padding differs
            with torch.no_grad():
                plain = model(input_ids=ids, attention_mask=mask).logits[:, -1]
                padded = model(input_ids=padded_ids, attention_mask=padded_mask).logits[:, -1]
                row0 = model(input_ids=padded_ids[:1, 2:], attention_mask=padded_mask[:1, 2:]).logits[:, -1]
            torch.testing.assert_close(padded[1:], plain[1:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded[:1], row0, atol=1e-5, rtol=1e-5)

    def test_generate_from_inputs_embeds(self):
        """``generate(inputs_embeds=...)`` produces the tokens ``generate(input_ids=...)`` appends."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
                self.skipTest("the model's prepare_inputs_for_generation does not take inputs_embeds, so generate() "
                              "refuses them (transformers' own check)")
            from_ids = self._generate(model, inputs)
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            from_embeds = self._generate(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
            self.assertTrue(torch.equal(from_embeds, from_ids[:, inputs["input_ids"].shape[1]:]))
            both = self._generate(model, {**inputs, "inputs_embeds": embeds})
            self.assertTrue(torch.equal(both, from_ids))

    def test_generate_continue_from_cache(self):
        """Continuing from the cache a first ``generate`` returned equals one longer ``generate``."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            full = self._generate(model, inputs, max_new_tokens=2 * self.max_new_tokens)
            first = self._generate(model, inputs, return_dict_in_generate=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, inputs["input_ids"].shape[1]:])], 1)
            second = self._generate(model, {"input_ids": first.sequences, "attention_mask": mask}, cache=first.cache)
            self.assertTrue(torch.equal(second, full))

    def test_generate_with_static_cache(self):
        """``cache_implementation="static"`` uses a static (compileable) cache and generates what the default does."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            dynamic = self._generate(model, inputs)
            static = self._generate(model, inputs, cache_implementation="static", return_dict_in_generate=True)
            self.assertTrue(getattr(static.cache, "is_compileable", False),
                            f"cache_implementation='static' was ignored: generate used a {type(static.cache).__name__}")
            self.assertTrue(torch.equal(static.sequences, dynamic))

    def test_assisted_decoding_matches_greedy_search(self):
        """Prompt-lookup and assisted decoding either equal greedy search, or, for a model whose recurrent states
        cannot be rolled back, refuse with transformers' ValueError."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate(batch_size=1)
            model = self._model(model_class, config)
            as_dict = {"max_new_tokens": 4, "return_dict_in_generate": True, "output_scores": True}
            greedy = self._generate(model, inputs, **as_dict)
            for extra in ({"prompt_lookup_num_tokens": 2}, {"assistant_model": model}):
                try:
                    out = self._generate(model, inputs, **as_dict, **extra)
                except ValueError as err:  # transformers >= 5.25: "... can be cropped ..."; 5.24: "... stateful models"
                    self.assertRegex(str(err), "cropped|stateful")
                    continue
                self._check_similar_generate_outputs(out, greedy, msg=str(list(extra)))

    def test_cache_format(self):
        """A forward with ``use_cache=True`` returns the cache layout the model documents."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
            batch, seq = inputs["input_ids"].shape
            self._check_cache_for_generate(batch, out.cache, seq, model.config)

    def test_generate_methods_with_logits_to_keep(self):
        """``forward(logits_to_keep=1)`` returns the last position's logits; generate's result does not change."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.prepare_config_and_inputs_for_generate()
            model = self._model(model_class, config)
            with torch.no_grad():
                full = model(**inputs).logits
                last = model(**inputs, logits_to_keep=1).logits
            self.assertEqual(last.shape[1], 1)
            torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)

    def test_generate_without_input_ids(self):
        """With a ``bos_token_id``, ``generate()`` starts from it when given no prompt."""
        for model_class in self.all_generative_model_classes:
            config, _ = self.prepare_config_and_inputs_for_generate()
            if config.bos_token_id is None:
                raise unittest.SkipTest("the config has no bos_token_id to start from")
            model = self._model(model_class, config)
            out = self._generate(model, {})
            self.assertEqual(out.shape, (1, 1 + self.max_new_tokens))
            self.assertEqual(int(out[0, 0]), config.bos_token_id)
