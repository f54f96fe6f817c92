"""The paper's three prompts: P_c (the subject), P_s (subject + source motion), P_t (subject + target motion).

One path for every front end: :func:`compose_prompts` cleans what a user typed
(:func:`eym.validate.check_prompt`), composes the prompts from a subject and two motions or takes
whole prompts, and derives a missing P_c from P_s alone. The CLI and the app both call it. The
rest are the checks and the encoding the Editor needs: token lengths against the text encoder's
limit, and CLIP embeddings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the grammar imports no torch: the app's page loads it without the model stack
    import torch

from eym.errors import EymError


@dataclass(frozen=True)
class Prompts:
    """The paper's three prompts."""

    content: str  # P_c: the subject alone, "A boy wearing black clothes and gray pants."
    source: str  # P_s: P_c plus the source motion, "... is dancing."
    target: str  # P_t: P_c plus the target motion, "... is playing basketball."


# ---------------------------------------------------------------------------------------------
# grammar
# ---------------------------------------------------------------------------------------------
# "is/are <verb>ing": where the motion phrase of a prompt starts
_BE = {"is", "are"}


def _words(text: str) -> list[str]:
    return text.split()


def _bare(word: str) -> str:
    return re.sub(r"[^\w-]", "", word.lower())


def _sentence(text: str) -> str:
    """Collapse whitespace, capitalise the first letter, end with one period."""
    text = " ".join(text.split()).rstrip(" .,;:")
    if not text:
        return ""
    return text[0].upper() + text[1:] + "."


def _with_be(subject: str, motion: str) -> str:
    motion = motion.strip()
    first = _bare(motion.split()[0]) if motion else ""
    return f"{subject.strip()} {motion}" if first in _BE else f"{subject.strip()} is {motion}"


def derive_content_prompt(source: str) -> str:
    """P_c from P_s alone: the subject, i.e. the words before the motion phrase.

    Rule: the motion phrase starts at the last "is/are <word>ing" of P_s ("A girl who is
    wearing a dress is dancing" gives "A girl who is wearing a dress."); without an "-ing" word
    at the last "is/are"; failing that, P_s itself (minus its final period) is P_c. P_t plays no
    part: tuning, and so its cache key, depends on the source side only (METHOD.md "Training").

    Args:
        source: P_s, e.g. "A boy in black is dancing on the beach."

    Returns:
        P_c as a sentence, e.g. "A boy in black."
    """
    words = _words(source)
    be = [i for i, w in enumerate(words) if i > 0 and _bare(w) in _BE]
    verbs = [i for i in be if i + 1 < len(words) and _bare(words[i + 1]).endswith("ing")]
    cut = (verbs or be or [None])[-1]
    return _sentence(" ".join(words[:cut]) if cut is not None else source)


def derive_prompts(
    subject: str | None = None,
    source_motion: str | None = None,
    target_motion: str | None = None,
    *,
    content: str | None = None,
    source: str | None = None,
    target: str | None = None,
) -> Prompts:
    """Compose the three prompts, either from a subject and two motions or from whole prompts.

    Two ways in (the app uses the first, the CLI the second):

    - ``subject`` + ``source_motion`` + ``target_motion``: P_c = subject, P_s = "<subject> is
      <source motion>.", P_t = "<subject> is <target motion>." ("is" is not doubled if the
      motion already starts with "is"/"are").
    - ``source`` + ``target`` (+ ``content``): whole prompts; a missing P_c is derived from P_s
      alone by :func:`derive_content_prompt`.

    The text is taken as it is (no cleaning): front ends call :func:`compose_prompts`.

    Args:
        subject: the subject alone, e.g. "A girl in a white dress".
        source_motion: what the subject does in the source video, e.g. "dancing on the beach".
        target_motion: what it should do instead; may be empty when only tuning.
        content, source, target: whole prompts, overriding the composed ones.

    Returns:
        :class:`Prompts`; ``target`` may be "" (only :meth:`eym.editor.Editor.infer` needs it).

    Raises:
        EymError: neither a subject nor a source prompt.
    """
    if subject and subject.strip():
        content = content or _sentence(subject)
        source = source or (_sentence(_with_be(subject, source_motion)) if source_motion else content)
        target = target or (_sentence(_with_be(subject, target_motion)) if target_motion else "")
    if not (source and source.strip()):
        raise EymError("no source prompt: give --source-prompt (e.g. 'A girl in a white dress is dancing.') or a subject")
    source = " ".join(source.split())
    target = " ".join((target or "").split())
    content = " ".join(content.split()) if content and content.strip() else derive_content_prompt(source)
    return Prompts(content=content, source=source, target=target)


def compose_prompts(
    subject: str | None = "",
    source_motion: str | None = "",
    target_motion: str | None = "",
    *,
    content: str | None = "",
    source: str | None = "",
    target: str | None = "",
    require_target: bool = True,
) -> Prompts:
    """The three prompts from what a user typed: cleaned, composed, P_c derived if missing.

    The one path of the CLI and the app. Every field is cleaned by
    :func:`eym.validate.check_prompt` (control characters and terminal escapes never reach the
    model, a settings file or a terminal; whitespace collapsed; a length cap), then
    :func:`derive_prompts` composes them: non-empty whole prompts win over ones composed from
    the subject and the motions.

    Args:
        subject, source_motion, target_motion: the parts, e.g. "A man in a red suit",
            "practicing tai chi", "raising both arms" (the app's fields).
        content, source, target: whole prompts P_c, P_s, P_t (the CLI's flags, the app's overrides).
        require_target: refuse an empty P_t (an edit); ``False`` where only tuning may follow.

    Returns:
        :class:`Prompts`.

    Raises:
        EymError: a field that is not text or too long, no subject and no source prompt, or
            (with ``require_target``) no target.
    """
    from eym.validate import check_prompt

    subject = check_prompt(subject, what="subject description")
    source_motion = check_prompt(source_motion, what="source motion")
    target_motion = check_prompt(target_motion, what="target motion")
    content = check_prompt(content, what="content prompt P_c")
    source = check_prompt(source, what="source prompt P_s")
    target = check_prompt(target, what="target prompt P_t")
    if not (subject or content or source):
        raise EymError("the subject description is empty: describe the person, e.g. 'A man in a white tai chi suit' "
                       "(or give the source prompt P_s)")
    prompts = derive_prompts(subject or None, source_motion or None, target_motion or None,
                             content=content or None, source=source or None, target=target or None)
    if require_target and not prompts.target:
        raise EymError("the target motion is empty: say what the person should do, e.g. 'raising both arms'")
    return prompts


# ---------------------------------------------------------------------------------------------
# checks and encoding
# ---------------------------------------------------------------------------------------------
def check_prompt_filled(text: str, what: str) -> None:
    """Refuse an empty prompt, naming it (``what``: "source prompt (P_s)", ...)."""
    if not (text and text.strip()):
        raise EymError(f"the {what} is empty; describe the video in words, e.g. 'A girl in a white dress is dancing.'")


def prompt_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` as the text encoder sees them, start and end tokens included."""
    return len(tokenizer(text, truncation=False).input_ids)


def check_prompt_lengths(tokenizer, prompts: Prompts) -> None:
    """Refuse prompts longer than the text encoder reads (77 tokens for CLIP, start and end included).

    The encoder would cut such a prompt silently, and the cut is the end: the motion phrase of
    P_s and P_t. Empty prompts are not checked here.

    Raises:
        EymError: naming the prompt, its length and the limit.
    """
    limit = tokenizer.model_max_length
    for what, text in (("subject prompt P_c", prompts.content), ("source prompt P_s", prompts.source),
                       ("target prompt P_t", prompts.target)):
        if text and (length := prompt_tokens(tokenizer, text)) > limit:
            raise EymError(
                f"the {what} is {length} tokens long and the text encoder reads at most {limit}, "
                f"so its end (the motion) would be cut off; shorten it by about {length - limit} words"
            )


@dataclass
class PromptEmbeds:
    """CLIP embeddings of the three prompts and the empty one, each (1, 77, D), encoded once per edit."""

    content: torch.Tensor  # P_c: tuning stage 1
    source: torch.Tensor  # P_s: tuning stage 2, inversion, the reconstruction branch
    target: torch.Tensor  # P_t: the editing branch
    negative: torch.Tensor  # "": the unconditional half of classifier-free guidance


def encode_prompt_embeds(tokenizer, text_encoder, prompts: Prompts) -> PromptEmbeds:
    """:class:`PromptEmbeds` of ``prompts`` in one text-encoder call (an empty P_t encodes as "")."""
    content, source, target, negative = encode_prompts(
        tokenizer, text_encoder, [prompts.content, prompts.source, prompts.target, ""]).split(1)  # 4 x (1, 77, D)
    return PromptEmbeds(content=content, source=source, target=target, negative=negative)


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings of prompts within the tokenizer's limit (:func:`check_prompt_lengths`).

    Args:
        prompts: N strings.

    Returns:
        (N, 77, D) embeddings on the text encoder's device and dtype.

    Raises:
        EymError: a prompt over the limit.
    """
    limit = tokenizer.model_max_length
    for prompt in prompts:
        if (length := prompt_tokens(tokenizer, prompt)) > limit:
            raise EymError(f"a prompt is {length} tokens long, more than the text encoder's {limit}; shorten it: {prompt!r}")
    ids = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    import torch

    with torch.no_grad():
        return text_encoder(ids.to(device))[0]  # (N, 77, D) last hidden state, as SD 1.5 uses


__all__ = ["Prompts", "PromptEmbeds", "compose_prompts", "encode_prompt_embeds", "derive_prompts", "derive_content_prompt", "check_prompt_filled",
           "prompt_tokens", "check_prompt_lengths", "encode_prompts"]
