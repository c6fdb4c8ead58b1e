"""The built-in chat templates (`data.template` = llama2 | llama3 | chatml | qwen3 | mistral |
alpaca): the text the official templates render, with each assistant turn's content and
end-of-turn token inside `{% generation %}` markers, so the loss mask is exact."""

_LLAMA2 = r"""
{%- if messages[0]['role'] == 'system' -%}
  {%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set system_message = none -%}{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if message['role'] == 'user' -%}
    {%- if loop.index0 == 0 and system_message is not none -%}
      {{- bos_token + '[INST] ' + ('<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content']) | trim + ' [/INST]' -}}
    {%- else -%}
      {{- bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' -}}
    {%- endif -%}
  {%- elif message['role'] == 'assistant' -%}
    {{- ' ' -}}{%- generation -%}{{- message['content'] | trim + ' ' + eos_token -}}{%- endgeneration -%}
  {%- else -%}
    {{- raise_exception('the llama2 template has no role ' + message['role']) -}}
  {%- endif -%}
{%- endfor -%}
"""

_LLAMA3 = r"""
{{- bos_token -}}
{%- for message in messages -%}
  {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}
  {%- if message['role'] == 'assistant' -%}
    {%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}
  {%- else -%}
    {{- message['content'] | trim + '<|eot_id|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

_CHATML = r"""
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\n' -}}
  {%- if message['role'] == 'assistant' -%}
    {%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}
  {%- else -%}
    {{- message['content'] + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# Qwen3 (the template in Qwen3's tokenizer_config.json): ChatML, tools listed in the system turn,
# tool calls as <tool_call> JSON, tool results as <tool_response> blocks in a user turn. An
# assistant turn after the last user query renders its reasoning (`reasoning_content`, or a
# `<think>...</think>` block at the start of its content) as `<think>\n...\n</think>\n\n`; the
# final turn always gets that block, empty without reasoning. Earlier turns lose their reasoning,
# as upstream, which is why this template needs markers: its earlier turns render differently once
# later ones exist, so prefix rendering cannot locate them. Supervised: everything the model
# generates after `<|im_start|>assistant\n` (the think block where rendered, the content, the tool
# calls) through `<|im_end|>`; the newline after `<|im_end|>` is not, as in `chatml`: generation
# stops at `<|im_end|>` and the template, not the model, writes that newline. `enable_thinking`
# only changes the generation prompt (False pre-fills an empty think block).
_QWEN3 = r"""
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if messages[0].role == 'system' -%}{{- messages[0].content + '\n\n' -}}{%- endif -%}
  {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' -}}{{- tool | tojson -}}{%- endfor -%}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif messages[0].role == 'system' -%}
  {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- endif -%}
{#- The last user query: the last user turn that is not a wrapped tool result. -#}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) -%}
{%- for message in messages[::-1] -%}
  {%- set index = (messages|length - 1) - loop.index0 -%}
  {%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) -%}
    {%- set ns.multi_step_tool = false -%}{%- set ns.last_query_index = index -%}
  {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- set content = message.content if message.content is string else '' -%}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
    {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
  {%- elif message.role == 'assistant' -%}
    {%- set reasoning_content = '' -%}
    {%- if message.reasoning_content is string -%}
      {%- set reasoning_content = message.reasoning_content -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
    {%- set think = loop.index0 > ns.last_query_index and (loop.last or reasoning_content) -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- generation -%}
      {%- if think -%}
        {{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
      {%- else -%}
        {{- content -}}
      {%- endif -%}
      {%- if message.tool_calls -%}
        {%- for tool_call in message.tool_calls -%}
          {%- if not loop.first or content -%}{{- '\n' -}}{%- endif -%}
          {%- if tool_call.function -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
          {{- '<tool_call>\n{"name": "' -}}{{- tool_call.name -}}{{- '", "arguments": ' -}}
          {%- if tool_call.arguments is string -%}
            {{- tool_call.arguments -}}
          {%- else -%}
            {{- tool_call.arguments | tojson -}}
          {%- endif -%}
          {{- '}\n</tool_call>' -}}
        {%- endfor -%}
      {%- endif -%}
      {{- '<|im_end|>' -}}
    {%- endgeneration -%}{{- '\n' -}}
  {%- elif message.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' -}}{{- content -}}{{- '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
"""

_MISTRAL = r"""
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
  {%- set system_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set system_prefix = '' -%}{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if message['role'] == 'user' -%}
    {{- '[INST] ' + (system_prefix if loop.first else '') + message['content'] + ' [/INST]' -}}
  {%- elif message['role'] == 'assistant' -%}
    {%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}
  {%- else -%}
    {{- raise_exception('the mistral template has no role ' + message['role']) -}}
  {%- endif -%}
{%- endfor -%}
"""

_ALPACA = r"""
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
  {{- messages[0]['content'] + '\n\n' -}}{%- set loop_messages = messages[1:] -%}
{%- else -%}
  {{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' -}}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if message['role'] == 'user' -%}
    {{- '### Instruction:\n' + message['content'] + '\n\n### Response:\n' -}}
  {%- elif message['role'] == 'assistant' -%}
    {%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}
    {%- if not loop.last -%}{{- '\n\n' -}}{%- endif -%}
  {%- else -%}
    {{- raise_exception('the alpaca template has no role ' + message['role']) -}}
  {%- endif -%}
{%- endfor -%}
"""

BUILTIN_TEMPLATES = {'llama2': _LLAMA2, 'llama3': _LLAMA3, 'chatml': _CHATML, 'qwen3': _QWEN3,
                     'mistral': _MISTRAL, 'alpaca': _ALPACA}
# The built-ins without a tool format. Records with tools or tool calls are refused before they
# render: `llama3` and `chatml` would drop the schemas and calls silently, the others raise on
# the tool role. `qwen3` renders both as Qwen3 does.
WITHOUT_TOOLS = ('llama2', 'llama3', 'chatml', 'mistral', 'alpaca')
