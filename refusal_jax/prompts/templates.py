"""Chat templates, post-instruction ("eoi") tokens, refusal tokens and left-padded tokenization (spec §4).

A `ChatFormat` is the user-turn template of one model family with no system prompt, e.g. ChatML
`"<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n"`. The tokens after `{instruction}` are
the eoi tokens; the difference-in-means directions are taken at those positions, which are the last `n_eoi`
positions of every left-padded prompt.

Template per config family (`ModelConfig.family`):

* `qwen` (Qwen-1), `qwen2` (Qwen2/2.5), `qwen3`: ChatML. Refusal strings "I", "As".
* `gemma`, `gemma2`, `gemma3`: `<start_of_turn>user ... <start_of_turn>model`. Refusal string "I".
* `mistral`: `"[INST] {instruction} [/INST]"`, or ChatML if the tokenizer has `<|im_start|>` (ChatML
  fine-tunes). Refusal string "I".
* `llama`: the architecture is shared by Llama-2, Llama-3, Yi and SmolLM2, which use different templates, so the
  template is chosen from the TOKENIZER (documented rule, in this order): a `<|im_start|>` token means ChatML
  (Yi, SmolLM2); a `<|start_header_id|>` token means Llama-3; a chat template containing `[INST]` means Llama-2.
  Anything else is a `ConfigError` (pass `style=` explicitly). Refusal string "I".

Tokenizers are Hugging Face tokenizers (duck-typed: `__call__`, `encode`, `decode`, `get_vocab`, `pad_token_id`,
`eos_token_id`, `chat_template`); nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from refusal_jax.errors import ConfigError, DataError
from refusal_jax.model import families
from refusal_jax.model.batching import left_pad

INSTRUCTION_FIELD = "{instruction}"

TEMPLATES = {
    "chatml": "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    # Qwen3 in non-thinking mode: its own chat template with enable_thinking=False adds an empty think block.
    # Not chosen automatically (the reference has no Qwen3); pass style="chatml_nothink" to use it.
    "chatml_nothink": "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "gemma": "<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n",
    # The reference's fixed (post PR #7) Llama-3 template: the tokenizer itself prepends <|begin_of_text|>.
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "[INST] {instruction} [/INST] ",  # trailing space kept, as in the reference
    "mistral": "[INST] {instruction} [/INST]",
}

FAMILIES = tuple(families.FAMILIES)

# Spec §4: the refusal token ids the reference hard-codes, keyed by the reference model it used them for, with
# the strings they decode to.
REFERENCE_REFUSAL_IDS = {
    "qwen": ((40, 2121), ("I", "As")),  # Qwen-1 Chat
    "yi": ((59597,), ("I",)),  # Yi Chat (llama architecture, ChatML template)
    "gemma": ((235285,), ("I",)),  # Gemma-1 IT
    "llama2": ((306,), ("I",)),  # Llama-2 Chat ("▁I")
    "llama3": ((40,), ("I",)),  # Llama-3 Instruct
}

EOI_MODES = ("template", "reference")
# Probe instructions for the common-suffix rule of eoi_mode="template": they end in different characters, so
# their common token suffix can only come from the template.
_EOI_PROBES = ("Hello there", "What is 2+2?", "Name three colors.")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A user-turn chat template with no system prompt.

    Attributes:
        family: the model config family it was made for (`ModelConfig.family`).
        template: the prompt, containing `{instruction}` exactly once.
        refusal_strings: strings whose first tokens are the refusal tokens (e.g. "I", "As").
        refusal_token_ids: the refusal token ids for one tokenizer; None until resolved (`chat_format_for` fills
            them in when given a tokenizer).
        style: template name, a key of `TEMPLATES` (or "custom").
    """

    family: str
    template: str
    refusal_strings: tuple[str, ...]
    refusal_token_ids: tuple[int, ...] | None = None
    style: str = "custom"

    def __post_init__(self):
        if self.template.count(INSTRUCTION_FIELD) != 1:
            raise ConfigError(f"chat template must contain {INSTRUCTION_FIELD} exactly once: {self.template!r}")
        if not self.refusal_strings:
            raise ConfigError("a chat format needs at least one refusal string")

    @property
    def prefix(self) -> str:
        """Template text before the instruction."""
        return self.template.split(INSTRUCTION_FIELD)[0]

    @property
    def suffix(self) -> str:
        """Template text after the instruction (the post-instruction / eoi text)."""
        return self.template.split(INSTRUCTION_FIELD)[-1]


def chat_format_for(cfg_family: str, tokenizer: Any = None, style: str | None = None) -> ChatFormat:
    """The chat format of a model family, with refusal token ids resolved for `tokenizer`.

    Args:
        cfg_family: `ModelConfig.family` ("llama", "mistral", "qwen", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3").
        tokenizer: the model's Hugging Face tokenizer. Needed for the llama family (the template is read off the
            tokenizer, see the module docstring) and to fill `refusal_token_ids`; None leaves them unresolved.
        style: force a template (a key of `TEMPLATES`) instead of the family's default.

    Returns:
        The `ChatFormat`.

    Raises:
        ConfigError: unknown family or style, or a llama-family tokenizer whose template cannot be told.
    """
    if cfg_family not in FAMILIES:
        raise ConfigError(f"no chat template for model family {cfg_family!r}; supported: {', '.join(FAMILIES)}")
    if style is not None and style not in TEMPLATES and style != MODEL_STYLE:
        raise ConfigError(f"unknown chat template style {style!r}; supported: {', '.join(TEMPLATES)}, {MODEL_STYLE}")
    spec = families.FAMILIES[cfg_family]
    if style is None:
        if spec.chat_style is not None:
            style = spec.chat_style
        elif cfg_family == "mistral":
            style = "chatml" if tokenizer is not None and _has_token(tokenizer, "<|im_start|>") else "mistral"
        else:
            style = _llama_style(tokenizer)
    strings = spec.refusal_strings
    template = model_template(tokenizer) if style == MODEL_STYLE else TEMPLATES[style]
    fmt = ChatFormat(family=cfg_family, template=template, refusal_strings=strings, style=style)
    if tokenizer is not None:
        fmt = dataclasses.replace(fmt, refusal_token_ids=refusal_token_ids(fmt, tokenizer))
    return fmt


MODEL_STYLE = "model"
_PLACEHOLDER = "\x00INSTRUCTION\x00"


def model_template(tokenizer: Any) -> str:
    """The model's own chat template (its `tokenizer.chat_template`, with any default system prompt it inserts)
    for one user turn plus the generation prompt, as a `{instruction}` template.

    The reference uses no system prompt; small chat models such as Qwen2.5 refuse far more often with the system
    prompt their own template adds, so this is offered as `style="model"` (`--chat-style model`).
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat-style model needs a tokenizer with a chat template")
    text = _render_bounded(tokenizer)
    if text.count(_PLACEHOLDER) != 1:
        raise ConfigError("the model's chat template does not place the user message exactly once")
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and getattr(tokenizer, "add_bos_token", False):
        text = text[len(bos):]  # the tokenizer adds BOS itself; never twice (the reference's old Llama-3 bug)
    return text.replace(_PLACEHOLDER, INSTRUCTION_FIELD)  # prompts are built by concatenation, braces are safe


TEMPLATE_SECONDS = 10.0  # a chat template that renders one user turn for longer than this is refused
TEMPLATE_MAX_CHARS = 1 << 20
TEMPLATE_MEMORY = 256 << 20  # bytes of address space a chat template may add while rendering one user turn


@contextlib.contextmanager
def _bounded_memory(extra: int):
    """Cap this process's address space (the soft RLIMIT_AS) at its current size + `extra` bytes for the duration.
    Only ever entered in the forked renderer child (`_render_in_child`): a process-wide cap in the parent would
    also starve JAX's threads. A no-op where the limit or /proc/self/statm is unavailable, or already tighter."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    cap = size + int(extra)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


_RETRY = "(pass --chat-style to use a built-in template)"


def _render_in_child(render, memory: int, seconds: float) -> tuple[str, str]:
    """`render()` in a forked child whose address space is capped at its size + `memory` bytes, awaited at most
    `seconds`: ("ok", text), ("memory", ""), ("error", description) or ("timeout", ""). The child runs Python only
    (jinja2) and leaves with os._exit; the parent's limits and threads are untouched."""
    import json
    import select
    import signal
    import time
    import warnings

    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns that fork and threads mix badly: the child never touches JAX
        pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            os.close(r)
            try:
                with _bounded_memory(memory):
                    result = ["ok", render()]
            except MemoryError:
                result = ["memory", ""]
            except BaseException as e:  # jinja2 TemplateError / SecurityError, raise_exception(), anything
                result = ["error", f"{type(e).__name__}: {str(e)[:200]}"]
            data = json.dumps(result if isinstance(result[1], str) else ["error", "rendered no text"]).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    chunks, outcome = [], None
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                outcome = ("timeout", "")
                break
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        if outcome is not None:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if outcome is not None:
        return outcome
    try:
        kind, text = json.loads(b"".join(chunks))
        return kind, text
    except ValueError:  # the child died before it could answer: out of memory in C code, or a signal
        return "memory" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else "error", (
            f"the renderer exited with status {status}")


def _render_bounded(tokenizer: Any) -> str:
    """Render the model's chat template for one user turn, bounded in time (TEMPLATE_SECONDS), memory
    (TEMPLATE_MEMORY more address space) and size (TEMPLATE_MAX_CHARS), in a forked child (`_render_in_child`; about
    a millisecond per render, once per run) where fork exists; any failure of the template (syntax error,
    raise_exception, sandbox violation) is a ConfigError."""

    def render():
        return tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False,
                                             add_generation_prompt=True)

    if hasattr(os, "fork"):
        kind, text = _render_in_child(render, TEMPLATE_MEMORY, TEMPLATE_SECONDS)
    else:  # no fork: rendered here, bounded in size only
        try:
            kind, text = "ok", render()
        except Exception as e:
            kind, text = "error", f"{type(e).__name__}: {str(e)[:200]}"
    if kind == "memory":
        raise ConfigError(f"the model's chat template needed more than {TEMPLATE_MEMORY >> 20} MiB to render one "
                          f"user turn; refusing it {_RETRY}")
    if kind == "timeout":
        raise ConfigError(f"the model's chat template took more than {TEMPLATE_SECONDS:g} s to render one user "
                          f"turn; refusing it {_RETRY}")
    if kind != "ok":
        raise ConfigError(f"the model's chat template failed: {text} {_RETRY}")
    if not isinstance(text, str) or len(text) > TEMPLATE_MAX_CHARS:
        raise ConfigError("the model's chat template rendered no text or more than 1 MiB for one user turn")
    return text


def _llama_style(tokenizer: Any) -> str:
    if tokenizer is None:
        raise ConfigError("the llama family covers Llama-2, Llama-3, Yi and SmolLM2, whose templates differ; "
                          "pass the tokenizer (or style=...) to choose one")
    if _has_token(tokenizer, "<|im_start|>"):
        return "chatml"
    if _has_token(tokenizer, "<|start_header_id|>"):
        return "llama3"
    if "[INST]" in (getattr(tokenizer, "chat_template", None) or ""):
        return "llama2"
    raise ConfigError("cannot tell the chat template of this llama-family tokenizer: it has neither <|im_start|> "
                      "(ChatML) nor <|start_header_id|> (Llama-3) tokens, and its chat template has no [INST] "
                      f"(Llama-2); pass style= one of {', '.join(TEMPLATES)}")


def _has_token(tokenizer: Any, token: str) -> bool:
    return token in tokenizer.get_vocab()


def format_instructions(fmt: ChatFormat, instructions: Sequence[str],
                        outputs: Sequence[str] | None = None) -> list[str]:
    """Puts instructions into the chat template.

    Args:
        fmt: the chat format.
        instructions: instruction strings.
        outputs: optional completions, appended right after the template (no EOS), as the reference does for
            the loss evaluation.

    Returns:
        One prompt string per instruction.

    Raises:
        DataError: a bare string instead of a list, or `outputs` of a different length.
    """
    if isinstance(instructions, str):
        raise DataError("format_instructions expects a list of instructions, got a single string")
    # Concatenation rather than str.format: braces inside an instruction are left alone either way, but a
    # custom template may contain other braces.
    prompts = [fmt.prefix + ins + fmt.suffix for ins in instructions]
    if outputs is None:
        return prompts
    if isinstance(outputs, str) or len(outputs) != len(prompts):
        raise DataError(f"outputs must be a list as long as instructions ({len(prompts)})")
    return [p + o for p, o in zip(prompts, outputs)]


def eoi_tokens(fmt: ChatFormat, tokenizer: Any, eoi_mode: str = "template") -> list[int]:
    """Token ids of the post-instruction template text (the eoi tokens).

    Two definitions, which agree for every template except Llama-2's:

    * `"template"` (default): the tokens that actually end a templated prompt. Several different probe
      instructions are templated and tokenized as real prompts, and their longest common token suffix is taken,
      so every eoi position holds the same token in every prompt.
    * `"reference"`: the reference's choice, `tokenizer.encode(suffix, add_special_tokens=False)`. For Llama-2,
      `encode(" [/INST] ")` gives 6 tokens `['▁', '▁[', '/', 'INST', ']', '▁']`, but in a prompt the space before
      `[/INST]` merges into `'▁['`, so the prompt ends with only the last 5 of them and "position -6" is the last
      instruction token, which differs per prompt (spec §13.1, §14.1.2). "template" gives those 5 tokens.

    Args:
        fmt: the chat format.
        tokenizer: Hugging Face tokenizer.
        eoi_mode: "template" or "reference".

    Returns:
        The eoi token ids.

    Raises:
        ConfigError: unknown mode, or a template with no post-instruction tokens.
    """
    if eoi_mode == "reference":
        toks = list(tokenizer.encode(fmt.suffix, add_special_tokens=False))
    elif eoi_mode == "template":
        seqs = [_encode_prompt(tokenizer, p) for p in format_instructions(fmt, _EOI_PROBES)]
        toks = _common_suffix(seqs)
    else:
        raise ConfigError(f"unknown eoi_mode {eoi_mode!r}; expected one of {', '.join(EOI_MODES)}")
    if not toks:
        raise ConfigError(f"template {fmt.template!r} has no post-instruction tokens (eoi_mode={eoi_mode!r})")
    return toks


def _encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    # As real prompts are encoded: with the tokenizer's special tokens (BOS where the model uses one).
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _common_suffix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Longest common suffix of token sequences."""
    n = min(len(s) for s in seqs)
    k = 0
    while k < n and len({s[len(s) - 1 - k] for s in seqs}) == 1:
        k += 1
    return list(seqs[0][len(seqs[0]) - k:]) if k else []


def check_eoi_alignment(tokenizer: Any, fmt: ChatFormat, instruction: str, eoi_mode: str = "template") -> bool:
    """Whether a real templated prompt ends with the eoi tokens of `eoi_mode`.

    Always true for "template" mode (by construction, unless the instruction's last token merges into the
    template); false for Llama-2 in "reference" mode (see `eoi_tokens`).

    Args:
        tokenizer: Hugging Face tokenizer.
        fmt: the chat format.
        instruction: an instruction to template and tokenize.
        eoi_mode: "template" or "reference".

    Returns:
        True if the prompt's last `n_eoi` token ids equal the eoi tokens.
    """
    toks = eoi_tokens(fmt, tokenizer, eoi_mode)
    ids = _encode_prompt(tokenizer, format_instructions(fmt, [instruction])[0])
    return ids[-len(toks):] == toks


def refusal_token_ids(fmt: ChatFormat, tokenizer: Any) -> tuple[int, ...]:
    """Refusal token ids (the set R of the refusal score, spec §6.1) for one tokenizer.

    Rule: if `fmt.refusal_token_ids` is set, those ids (checked against the vocabulary). Else, if the
    reference hard-codes ids for this template (spec §4: Qwen-1 (40, 2121), Yi (59597,), Gemma (235285,),
    Llama-2 (306,), Llama-3 (40,)) and in this tokenizer each of them exists and decodes to its refusal string
    ("I", "As"), the reference ids. Otherwise the first token of `tokenizer.encode(s, add_special_tokens=False)`
    for each refusal string `s`, deduplicated in order.

    Args:
        fmt: the chat format.
        tokenizer: Hugging Face tokenizer.

    Returns:
        The refusal token ids.

    Raises:
        ConfigError: explicit ids outside the vocabulary, or a refusal string that encodes to nothing.
    """
    vocab_size = len(tokenizer)
    if fmt.refusal_token_ids is not None:
        bad = [i for i in fmt.refusal_token_ids if not 0 <= i < vocab_size]
        if bad or not fmt.refusal_token_ids:
            raise ConfigError(f"refusal token ids {list(fmt.refusal_token_ids)} not in a vocabulary of {vocab_size}")
        return tuple(fmt.refusal_token_ids)
    ref = REFERENCE_REFUSAL_IDS.get(_reference_key(fmt))
    if ref is not None:
        ids, strings = ref
        if all(0 <= i < vocab_size and tokenizer.decode([i]).strip() == s for i, s in zip(ids, strings)):
            return ids
    out: list[int] = []
    for s in fmt.refusal_strings:
        toks = tokenizer.encode(s, add_special_tokens=False)
        if not toks:
            raise ConfigError(f"refusal string {s!r} encodes to no tokens")
        if toks[0] not in out:
            out.append(int(toks[0]))
    return tuple(out)


def _reference_key(fmt: ChatFormat) -> str | None:
    if fmt.style == "chatml":
        # ChatML as the family's own template is Qwen's; on a llama-architecture model it is Yi's
        return "qwen" if fmt.family in families.FAMILIES and families.FAMILIES[fmt.family].chat_style == "chatml" \
            else "yi"
    return fmt.style if fmt.style in ("gemma", "llama2", "llama3") else None


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes prompts into a LEFT-padded batch, so the last positions of every row are the eoi tokens.

    Special tokens are added as the tokenizer does by default (BOS for Llama-3, Gemma, Llama-2, Mistral; nothing
    for ChatML tokenizers). Padding is done here rather than by the tokenizer, so the tokenizer object is never
    mutated: the pad id is `tokenizer.pad_token_id`, or `eos_token_id` when there is no pad token (as the
    reference sets `pad_token = eos_token`). Padded positions have attention mask 0, so their id never matters.

    Args:
        tokenizer: Hugging Face tokenizer.
        prompts: prompt strings (already templated).
        max_length: truncate each prompt to this many tokens (the tokenizer's truncation side, right by
            default), as the reference does for Pile documents; None = no truncation.

    Returns:
        `(input_ids, attention_mask)`, both np.int32 of shape [B, T], T = the longest prompt.

    Raises:
        DataError: no prompts, a prompt with no tokens, or a duplicated BOS (a template that already starts with
            the BOS text, the reference's Llama-3 bug of spec §14.1.1).
        ConfigError: a tokenizer with neither a pad nor an EOS token.
    """
    if isinstance(prompts, str):
        raise DataError("tokenize expects a list of prompts, got a single string")
    prompts = list(prompts)
    if not prompts:
        raise DataError("tokenize got no prompts")
    kwargs: dict[str, Any] = {"add_special_tokens": True}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    seqs = [list(s) for s in tokenizer(prompts, **kwargs)["input_ids"]]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError("tokenizer has neither a pad nor an EOS token to pad with")
    bos = getattr(tokenizer, "bos_token_id", None)
    for i, s in enumerate(seqs):
        if not s:
            raise DataError(f"prompt {i} tokenizes to zero tokens")
        if bos is not None and len(s) >= 2 and s[0] == s[1] == bos:
            raise DataError(f"prompt {i} starts with two BOS tokens: the template must not contain the BOS text, "
                            "the tokenizer adds it")
    return left_pad(seqs, pad_id, max(len(s) for s in seqs))
