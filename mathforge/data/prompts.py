"""Math prompts (NeMo-Skills' `generic/math` and `openmath/tir`) and their chat rendering.

The user messages are byte-for-byte NeMo-Skills' prompt configs with no few-shot examples:
`generic/math` for plain reasoning (also what OpenMath-Nemotron-14B-Kaggle and the FP8 calibration recipe use,
even for tool-integrated solutions), `openmath/tir` for OpenMath models that may call Python in
`<tool_call>` tags. Rendering goes through the tokenizer's own chat template with
`add_generation_prompt=True`, as NeMo-Skills does at HEAD (`Prompt.fill(..., format_as_string=True)`).
By default no system message is sent (NeMo-Skills HEAD); pass `system=""` for the legacy explicit empty one.
"""

from __future__ import annotations

from typing import Any

# nemo_skills/prompt/config/generic/math.yaml (`{examples}` empty)
MATH_USER_TEMPLATE = "Solve the following math problem. Make sure to put the answer (and only answer) inside \\boxed{{}}.\n\n{problem}"

# nemo_skills/prompt/config/openmath/tir.yaml
TIR_USER_TEMPLATE = (
    "Solve the following math problem, integrating natural language reasoning with Python code executions.\n"
    "You may perform up to {total_code_executions} Python code calls to assist your reasoning.\n"
    "Make sure to put the answer (and only answer) inside \\boxed{{}}.\n\n"
    "{problem}"
)

# NeMo-Skills' default max_code_executions (and the OMR evals' total_code_executions_in_prompt)
DEFAULT_CODE_EXECUTIONS = 8

# nemo_skills/prompt/code_tags/openmath.yaml (HEAD): code in <tool_call>...</tool_call>, output fenced after it
OPENMATH_CODE_TAGS = {
    "code_begin": "<tool_call>",
    "code_end": "</tool_call>",
    "code_output_begin": "\n```output\n",
    "code_output_end": "```\n",
    "code_output_format": "qwen",
}


def math_user_message(
    problem: str, *, tools: bool = False, total_code_executions: int = DEFAULT_CODE_EXECUTIONS
) -> str:
    """The user turn for one problem: `generic/math`, or `openmath/tir` when `tools`."""
    if tools:
        return TIR_USER_TEMPLATE.format(problem=problem, total_code_executions=total_code_executions)
    return MATH_USER_TEMPLATE.format(problem=problem)


def chat_messages(
    problem: str,
    *,
    tools: bool = False,
    total_code_executions: int = DEFAULT_CODE_EXECUTIONS,
    system: str | None = None,
    response: str | None = None,
) -> list[dict[str, str]]:
    """OpenAI-style messages: [system], user, [assistant response]."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append(
        {
            "role": "user",
            "content": math_user_message(problem, tools=tools, total_code_executions=total_code_executions),
        }
    )
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def render_chat(
    tokenizer: Any,
    problem_text: str,
    *,
    tools: bool,
    total_code_executions: int = DEFAULT_CODE_EXECUTIONS,
    system: str | None = None,
) -> str:
    """The prompt string a completions endpoint gets: the chat template with the assistant turn opened."""
    messages = chat_messages(
        problem_text, tools=tools, total_code_executions=total_code_executions, system=system
    )
    return _apply(tokenizer, messages, add_generation_prompt=True)


def render_chat_with_response(
    tokenizer: Any,
    problem_text: str,
    response: str,
    *,
    tools: bool = False,
    total_code_executions: int = DEFAULT_CODE_EXECUTIONS,
    system: str | None = None,
) -> str:
    """Prompt plus a finished assistant turn (closed by the template's end-of-turn), e.g. for calibration text."""
    messages = chat_messages(
        problem_text,
        tools=tools,
        total_code_executions=total_code_executions,
        system=system,
        response=response,
    )
    return _apply(tokenizer, messages, add_generation_prompt=False)


def _apply(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        # NeMo-Skills' fallback for tokenizers without a chat template: bos + user text (+ the response)
        bos = getattr(tokenizer, "bos_token", None) or ""
        return bos + "".join(m["content"] for m in messages if m["role"] in ("user", "assistant"))
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
