"""Build a tiny weightless Qwen2 model folder offline and byte-for-byte reproducibly, so tests never need the hub."""

from __future__ import annotations

import argparse
import json
import os
import pathlib

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single-threaded BPE training -> deterministic merges
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

EOS = "<|endoftext|>"
# A plain-text chat template (no special tokens beyond EOS), so the OpenAI chat endpoint works on this model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TARGET_VOCAB = 1500
# Same split regex as transformers' Qwen2Tokenizer, so both loading paths tokenize identically.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SENTENCES = [
    "the cat sat on the mat.",
    "the dog ran to the park.",
    "a bird sang in the tree.",
    "the sun is hot and the moon is cold.",
    "she reads a book every night.",
    "he drinks water in the morning.",
    "we like to walk by the river.",
    "they play games after school.",
    "the quick brown fox jumps over the lazy dog.",
    "I have two apples and three pears.",
    "my house has a red door and a green roof.",
    "the train leaves at nine o'clock.",
    "please open the window, it's warm today.",
    "what time is it? it is ten past four.",
    "can you count from one to ten?",
    "yes, I can count to one hundred.",
    "the answer is forty two.",
    "hello world!",
    "good morning, how are you?",
    "I am fine, thank you.",
    "the little fish swims in the blue sea.",
    "snow falls in winter and flowers grow in spring.",
    "the teacher writes on the board.",
    "children laugh and sing together.",
    "the old man sleeps in his chair.",
    "once upon a time there was a small village.",
    "the king and the queen lived in a castle.",
    "bread, milk, eggs and cheese are on the table.",
    "the car is fast but the bus is slow.",
    "do not forget to close the door.",
    "this is the end of the story.",
]
ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey"]
ANIMALS = [
    "cat",
    "dog",
    "horse",
    "cow",
    "sheep",
    "pig",
    "duck",
    "mouse",
    "lion",
    "tiger",
    "bear",
    "rabbit",
    "fox",
    "wolf",
    "frog",
    "owl",
    "goat",
    "monkey",
    "elephant",
    "zebra",
]
THINGS = [
    "ball",
    "hat",
    "box",
    "cup",
    "car",
    "kite",
    "shoe",
    "chair",
    "lamp",
    "pen",
    "book",
    "bag",
    "coat",
    "flower",
    "apple",
    "banana",
    "cake",
    "house",
    "boat",
    "clock",
]
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo"]
VERBS = [
    "bought",
    "painted",
    "carried",
    "found",
    "washed",
    "dropped",
    "opened",
    "cleaned",
    "borrowed",
    "repaired",
    "hid",
    "threw",
    "caught",
    "pushed",
    "pulled",
    "kicked",
    "wrapped",
    "sold",
    "lost",
    "shared",
]
ADJS = [
    "big",
    "small",
    "tall",
    "short",
    "happy",
    "sad",
    "bright",
    "dark",
    "heavy",
    "light",
    "soft",
    "hard",
    "new",
    "old",
    "clean",
    "dirty",
    "funny",
    "quiet",
    "loud",
    "strange",
    "beautiful",
    "wonderful",
]
PLACES = [
    "kitchen",
    "garden",
    "library",
    "market",
    "station",
    "forest",
    "beach",
    "mountain",
    "village",
    "hospital",
    "museum",
    "bridge",
    "island",
    "church",
    "office",
    "theatre",
    "airport",
    "valley",
]


def number_word(n: int) -> str:
    """Spell 0-99 in English words."""
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])


def corpus() -> list[str]:
    """Return the fixed built-in training corpus (order matters for determinism)."""
    lines = list(SENTENCES)
    lines += [f"{n} is {number_word(n)}." for n in range(100)]
    lines += [f"count: {', '.join(str(i) for i in range(s, s + 10))}." for s in range(0, 100, 10)]
    lines += [
        f"{a} + {b} = {a + b} and {number_word(a)} plus {number_word(b)} is {number_word(a + b)}."
        for a in range(10)
        for b in range(10)
    ]
    lines += [f"{a} - {b} = {a - b}, {a} * {b} = {a * b}." for a in range(10) for b in range(a + 1)]
    lines += [f"today is {d}, tomorrow is {DAYS[(i + 1) % 7]}." for i, d in enumerate(DAYS)]
    lines += [f"after {m} comes {MONTHS[(i + 1) % 12]}." for i, m in enumerate(MONTHS)]
    lines += [f"the {a} has a {c} {t}." for a, c, t in zip(ANIMALS, COLOURS * 2, THINGS, strict=False)]
    lines += [
        f"I see {number_word(i + 2)} {c} {t}s." for i, (c, t) in enumerate(zip(COLOURS, reversed(THINGS), strict=False))
    ]
    lines += [
        f"The {a.capitalize()} likes {DAYS[i % 7].capitalize()} in {MONTHS[i % 12].capitalize()}."
        for i, a in enumerate(ANIMALS)
    ]
    lines += [
        f"{n} {v} the {a} {t} in the {p} on {d}."
        for i, (n, v, a, t, p, d) in enumerate(
            zip(NAMES * 5, VERBS * 3, ADJS * 3, THINGS * 3, PLACES * 4, DAYS * 9, strict=False)
        )
    ]
    lines += [
        f"Yesterday {n.lower()} walked to the {p} because it was {a}."
        for n, p, a in zip(NAMES * 2, reversed(PLACES), ADJS, strict=False)
    ]
    return lines


def train_tokenizer() -> Tokenizer:
    """Train a Qwen2-style byte-level BPE tokenizer on the built-in corpus."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=1,
        show_progress=False,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def write_json(path: pathlib.Path, obj: object) -> None:
    """Write JSON with stable formatting."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def build(out_dir: pathlib.Path) -> None:
    """Write config, generation config and tokenizer files (no weights) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok_json = json.loads(tok.to_str())
    vocab: dict[str, int] = tok_json["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    eos_id = tok.token_to_id(EOS)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-n_tok // 64) * 64

    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    write_json(out_dir / "vocab.json", dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    added = {
        str(eos_id): {
            "content": EOS,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    }
    write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "added_tokens_decoder": added,
            "add_prefix_space": False,
            "bos_token": EOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 512,
            "errors": "replace",
            "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(out_dir / "special_tokens_map.json", {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS})
    write_json(
        out_dir / "config.json",
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-6,
            "use_cache": True,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 4,
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
            "dtype": "bfloat16",
        },
    )
    write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
            "do_sample": False,
        },
    )


def main() -> None:
    """Parse arguments and build the model folder."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "out_dir",
        type=pathlib.Path,
        nargs="?",
        default=pathlib.Path("models/tiny"),
        help="output folder (default: models/tiny)",
    )
    args = parser.parse_args()
    build(args.out_dir)
    print(f"wrote tiny Qwen2 model folder to {args.out_dir}")


if __name__ == "__main__":
    main()
