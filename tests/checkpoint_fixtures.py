"""A tiny random-weight checkpoint folder with a tokenizer, for tests of the CLI and the local backend."""

from moecoder.checkpoint import save_checkpoint
from moecoder.config import get_preset
from moecoder.model import Transformer
from moecoder.tokenizer import train_byte_bpe

CORPUS = ["def square(x):\n    return x * x\n", "for k, v in items.items():\n    print(k, v)\n"] * 40


def tiny_checkpoint(root):
    """The debug preset (vocabulary of a 300-id BPE trained on CORPUS) saved under root/model; EOS id 0."""
    tok = train_byte_bpe(CORPUS, 300, root / "tok")
    cfg = get_preset("debug").replace(vocab_size=tok.vocab_size, norm_topk=True)
    m = Transformer(cfg)
    m.init_weights(std=0.1, seed=0)
    return save_checkpoint(m, root / "model", tokenizer_dir=root / "tok", extra_config={"eos_token_id": 0})
