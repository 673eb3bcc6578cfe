"""A tiny random Llama, its tokenizer and a LoRA adapter for it: real vLLM without a download.

Run with the vLLM environment's Python (it needs torch, transformers, tokenizers and peft):

    .venv-vllm/bin/python tests/real_vllm/make_tiny_model.py OUT_DIR

writes OUT_DIR/model (weights, config, tokenizer, chat template) and OUT_DIR/adapter (a
rank-8 LoRA on q_proj/v_proj). Seeded, so the same script makes the same files. Sizes are
the smallest vLLM's CPU backend accepts: head_dim 32 (its attention rejects 16).
"""

from __future__ import annotations

import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex an old jukebox "
    "near misty docks and vexed pilots fly home hello world tell me a story about canaries "
    "rolling out new versions of language models without downtime"
)


def tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    words = CORPUS.split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    bpe.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=2048,
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def main(root: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model_dir, adapter_dir = root / "model", root / "adapter"
    tok = tokenizer(model_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)  # random B: the adapter changes the output
    get_peft_model(model, lora).save_pretrained(adapter_dir)
    print(f"tiny model in {model_dir}, adapter in {adapter_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
