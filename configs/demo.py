"""The demo: a tiny LLaMA learns synthetic instruction tasks on a laptop CPU, no download.

  jaxsft train --config configs/demo.py --workdir /tmp/demo

jaxsft writes its own data (word and unit-conversion tasks with exact answers) and a
character tokenizer into the work directory, trains a 2-layer model from scratch, and prints
held-out exact-match accuracy before and after training with a few generated answers.
"""

from jaxsft.config import default_config


def get_config():
  config = default_config()
  config.demo.enabled = True
  config.demo.num_train = 6000
  config.demo.num_eval = 200
  config.model.architecture = {
      'vocab_size': 128,  # replaced by the demo tokenizer's size
      'hidden_size': 128, 'intermediate_size': 256, 'num_layers': 2, 'num_heads': 4,
      'num_kv_heads': 4, 'max_position_embeddings': 512, 'tie_word_embeddings': True,
  }
  config.model.dtype = 'float32'  # a from-scratch model, tuned (learning rate, steps) in float32
  config.model.attention_implementation = 'xla'
  config.data.template = 'chatml'
  config.data.max_seq_len = 128
  config.batch_size = 8
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 50
  config.optim.schedule = 'cosine'
  config.optim.min_lr_ratio = 0.1
  config.optim.weight_decay = 0.0
  config.train.num_steps = 1200
  config.train.log_every = 100
  config.train.sample_prompts = ['upper kite', 'km to m: 47']
  config.train.sample_every = 600
  config.train.sample_max_new_tokens = 12
  return config
