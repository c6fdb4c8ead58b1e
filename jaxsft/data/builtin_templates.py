"""The built-in chat templates (`data.template` = llama2 | llama3 | chatml | mistral | alpaca):
the text the official templates render, with each assistant turn's content and end-of-turn
token inside `{% generation %}` markers, so the loss mask is exact."""

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

BUILTIN_TEMPLATES = {'llama2': _LLAMA2, 'llama3': _LLAMA3, 'chatml': _CHATML,
                     'mistral': _MISTRAL, 'alpaca': _ALPACA}
