"""lm-evaluation-harness model for danube: ``simple_evaluate(model=DanubeLM(...))``.

It scores exactly what lm-eval's own ``hf`` model scores on the exported Hugging Face
directory: the same tokenization (BOS first, text read as markup as the exported
tokenizer reads it, context/continuation split by ``TemplateLM``), the same left
truncation to ``max_length``, and greedy generation that stops on the same strings, with
the repetition penalty the model's generation config gives transformers when the task
sets none (1.1 for a danube export: the report's). Requests are sorted longest first and
batched, so padding is small and a too-long batch fails at the start rather than at the end.

Registered as ``danube`` too: ``lm_eval --model danube --model_args pretrained=DIR``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from danube.eval.inference import TextTokenizer, default_repetition_penalty, load_for_eval
from danube.hf import REPORT_GENERATION
from danube.model import Danube
from danube.model.generate import SamplingParams, generate

log = logging.getLogger(__name__)


@register_model("danube")
class DanubeLM(TemplateLM):
    """A danube model (danube or Hugging Face directory) behind lm-eval's request API.

    Args:
        pretrained: model directory (config.yaml + model.safetensors) or Hugging Face directory.
        tokenizer: tokenizer to use instead of the directory's own.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        batch_size: requests per forward pass.
        max_length: context limit; default the model's ``max_seq_len`` (as ``hf`` reads it).
        max_gen_toks: generation limit when a task does not set one.
        repetition_penalty: when a task does not set one; default what the model's
            generation config gives transformers (``hf`` applies it too): 1.1 for a danube
            model directory or export, the report's decoding; 1.0 for plain greedy.
    """

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        repetition_penalty: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            log.warning("DanubeLM ignores unknown arguments %s", sorted(kwargs))
        model, tok = load_for_eval(pretrained, tokenizer, device, dtype)
        # `hf` generates with the exported generation_config.json's defaults: so do we.
        self._setup(model, tok, str(pretrained), batch_size, max_length, max_gen_toks,
                    repetition_penalty if repetition_penalty is not None else default_repetition_penalty(pretrained))

    @classmethod
    def from_model(
        cls,
        model: Danube,
        tok: TextTokenizer,
        name: str,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        repetition_penalty: float = REPORT_GENERATION["repetition_penalty"],
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> DanubeLM:
        """A model already in memory (the one being trained), scored as a model directory of it would be.

        The caller puts it in eval mode. ``repetition_penalty`` defaults to a danube model
        directory's (:func:`~danube.eval.inference.default_repetition_penalty`). With
        ``world_size`` > 1, lm-eval gives this process every ``world_size``-th document
        from ``rank`` and gathers the metrics on rank 0 (``torch.distributed`` initialised).
        ``progress``: the request bars (off: the training's console shows its own).
        """
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self._setup(model, tok, name, batch_size, max_length, max_gen_toks, repetition_penalty)
        self._rank, self._world_size = int(rank), int(world_size)
        self.progress = progress
        return self

    def _setup(self, model: Danube, tok: TextTokenizer, name: str, batch_size: int | str, max_length: int | None,
               max_gen_toks: int, repetition_penalty: float) -> None:
        self.model, self.tok = model, tok
        self._device = next(self.model.parameters()).device
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_length = int(max_length or self.model.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.pretrained = name
        self.repetition_penalty = float(repetition_penalty)
        self.progress = True  # lm-eval's bars over the requests

    # -- lm-eval's data-parallel protocol (used only when world_size > 1) ------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        torch.distributed.barrier()

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.source)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # As `hf`: BOS unless told otherwise, or unless the string already starts with the BOS
        # piece, which reading the string as markup turns into the BOS id itself.
        if add_special_tokens is None:
            add_special_tokens = not (self.tok.bos_id >= 0 and string.startswith(self.tok.bos_text))
        return self.tok.encode(string, bos=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-softmax ``(B, T_max, V)`` of right-padded rows (causal: padding never seen)."""
        t = max(map(len, rows))
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        logits = self.model(ids.to(self._device))
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        def longest_first(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(requests, sort_fn=longest_first)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="danube loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            rows, conts = [], []
            for _, ctx, cont in chunk:
                if not ctx or not cont:
                    raise ValueError("lm-eval sent an empty context or continuation")
                # Keep the last max_length tokens of context+continuation as the input (as `hf` does).
                rows.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            logprobs = self._logprobs(rows)
            for (req_str, _, _), row, cont, lp in zip(chunk, rows, conts, logprobs):
                n = len(cont)
                lp = lp[len(row) - n : len(row)]  # (n, V): predictions of the continuation tokens
                target = torch.tensor(cont, device=lp.device)
                is_greedy = bool((lp.argmax(-1) == target).all())
                answer = (float(lp.gather(-1, target[:, None]).sum()), is_greedy)
                results.append(answer)
                if req_str is not None:
                    self.cache_hook.add_partial("loglikelihood", req_str, answer)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            w = [
                (None,) + make_disjoint_window(pair)
                for pair in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows.extend(w)
            counts.append(len(w))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm or not self.progress)
        totals, i = [], 0
        for req, n in zip(requests, counts):
            total = sum(s for s, _ in scores[i : i + n])
            i += n
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="danube generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}")
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=temperature if do_sample else 0.0,
                top_k=int(kwargs.pop("top_k", 0) or 0),
                top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                repetition_penalty=float(kwargs.pop("repetition_penalty", self.repetition_penalty)),
                stop_token_ids=(self.tok.eos_id,),
                stop_strings=tuple(s for s in until if s),
            )
            if kwargs:
                log.warning("generate_until ignores generation arguments %s", sorted(kwargs))
            prompts = [self.tok_encode(c)[-max_ctx:] for c in contexts]
            outs = generate(self.model, prompts, params, decode=self.tok.decode, pad_id=self.prefix_token_id)
            for context, gen_kwargs, out in zip(contexts, all_kwargs, outs):
                text = postprocess_generated_text(self.tok.decode(out), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)
