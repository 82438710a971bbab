"""Reference tokenization of a GGUF file's vocabulary by llama.cpp (through llama-cpp-python).

Qwen2's original tokenizer (tokenizer.json) NFC-normalizes its input and tandem does too, while
llama.cpp skips that step; with --nfc the texts are NFC-normalized here first, so both sides see the
same characters. Prints [[ids, text as tokenized], ...].

usage: python3 tokenize_reference.py MODEL.gguf [--nfc] < strings.json > ids.json
"""
import json
import sys
import unicodedata

from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
nfc = "--nfc" in sys.argv[2:]
texts = [unicodedata.normalize("NFC", t) if nfc else t for t in json.load(sys.stdin)]
json.dump([[llm.tokenize(t.encode("utf-8"), add_bos=False, special=True), t] for t in texts], sys.stdout)
