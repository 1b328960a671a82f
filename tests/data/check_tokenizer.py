"""shardlm_tokenize against Hugging Face `tokenizers` (the reference) with the Llama 3 tokenizer.json.

  check_tokenizer.py --tool build/bin/shardlm_tokenize --tokenizer ../shared/data/llama3-tokenizer/tokenizer.json
                     --corpus examples/data/corpus.txt --workdir DIR

1. encode: a varied corpus (contractions in any case, numbers of every length, whitespace runs, newlines, CJK,
   emoji ZWJ sequences, accents, control characters, code, special tokens written in the text, long runs, the
   lines of corpus.txt, and seeded random strings) through `--encode-jsonl`, compared id for id with
   `Tokenizer.encode(s, add_special_tokens=False).ids`;
2. decode: our ids through `--decode-jsonl` give the text back, and tokenizers' decode of the same ids;
3. shards: text, JSONL and Alpaca files through `--output`: the .bin must be tokenizers' ids of every document
   framed by BOS/EOS and the .mask must mark exactly the responses and EOS.
Stops at the first mismatch, printing the text and both id lists. Exits 77 (CTest SKIP) without the tokenizer.
"""
import argparse
import json
import os
import random
import subprocess
import sys

SKIP = 77

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def hand_written():
    """(class, text) pairs covering each part of the pre-tokenizer regex and the byte-level alphabet."""
    cases = []
    add = lambda cls, *texts: cases.extend((cls, t) for t in texts)
    suffixes = ["s", "t", "re", "ve", "m", "ll", "d"]
    for suf in suffixes:  # every case combination of every contraction, after letters, spaces and digits
        for mask in range(1 << len(suf)):
            cased = "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate(suf))
            add("contractions", f"it'{cased}", f"'{cased} x", f"9'{cased}", f" '{cased}'", f"they'{cased}ll")
    add("contractions", "I'M HERE, YOU'RE NOT; SHE'LL GO, WE'D", "don’t won’t (typographic apostrophe)",
        "rock 'n' roll", "'''", "O'Neill's", "'ſ 'K 'ſt")  # ſ and K: Unicode case folding of s and k
    for n in range(1, 26):  # numbers of every length, alone, in words, with separators
        digits = "".join(str((7 * i + 3) % 10) for i in range(n))
        add("numbers", digits, f"x{digits}y", f" {digits} ", f"-{digits}.{digits[::-1]}", f"{digits},{digits}")
    add("numbers", "0", "007", "3.14159", "1e-10", "1,000,000", "2026-11-21", "٣٤٥ ۱۲۳ १२३", "½ ² ³ ⅷ Ⅻ",
        "１２３４５", "12abc34", "v1.2.3-rc4")
    for n in range(1, 18):  # whitespace runs of every length, before words, at the end, mixed
        add("whitespace", " " * n, "a" + " " * n + "b", " " * n + "x", "x" + " " * n, "\t" * n + "y",
            "a" + " \t" * n + "b")
    add("whitespace", "\u00a0\u1680\u2000\u2001\u2002\u200a\u202f\u205f\u3000", "a\u00a0b c\u3000d",
        "x \u2028 y \u2029 z", "\u200b\u200c\u200d\ufeff", "a \u0085 b", "\u180e x \u180e")
    add("newlines", "\n", "\n\n", "\r\n", "\r\n\r\n", "\r", "a\nb", "a\n\nb", "a \n b", "a  \n\n  b",
        "x\n \n \ny", "end.\n", "\n\n\nstart", "line\r\nline\rline\n", "tab\t\n\tnext", "  \n", ".\n\n")
    add("cjk", "日本語のテキストです。", "中文文本，包括标点。", "한국어 텍스트입니다", "漢字かなカナ混じり文",
        "東京 2026年11月21日", "ｈａｌｆ／ｆｕｌｌ　ｗｉｄｔｈ", "𠀀𠀁𪚥 (supplementary plane)")
    add("emoji", "👨‍👩‍👧‍👦", "👩🏽‍💻 codes", "🏳️‍🌈🇫🇷🇯🇵", "❤️‍🔥!", "🙂🙃😉", "a👍b", "🧑🏿‍🤝‍🧑🏻", "#️⃣ 1️⃣")
    add("accents", "café naïve résumé", "cafe\u0301 (combining)", "Ångström Øresund", "İstanbul ıi",
        "Straße STRASSE", "ἀρχή Ελληνικά", "Русский текст", "עברית العربية", "ẞ ǅ ǈ", "Z\u0351\u0362a\u0300\u0301l\u0302g\u0303o")
    for c in list(range(0, 32)) + [127, 0x80, 0x85, 0x9f]:
        add("control", f"a{chr(c)}b", f"{chr(c)} {chr(c)}{chr(c)}", f"x {chr(c)}y")
    add("code", "def f(x):\n    return x ** 2  # square\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        '{"key": [1, 2.5, null], "nested": {"a": "b"}}',
        "<div class=\"x\">&amp;&nbsp;</div>", "SELECT * FROM t WHERE id <> 3;", "x=>x!==y&&z||w",
        "#include <vector>\nint main(){return 0;}", "    \n    pass\n\n\n", "a_b__c___d ____", "$$\\frac{1}{2}$$")
    add("special", "<|begin_of_text|>Hello<|end_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "<|eot_id|><|eot_id|>", "<|begin_of_text|", "<<|eot_id|>>", "x <|eot_id|> y", "<|reserved_special_token_5|>",
        "<|finetune_right_pad_id|><|python_tag|>", "<|eom_id|>\n", "< |eot_id|>", "<|EOT_ID|>", "<|eot_id|")
    # Vocabulary tokens that merging by rank would not reach: only ignore_merges makes them one token.
    add("ignore_merges", " việc", "Tôi có nhiều việc hợp điều ở Việt Nam", " jeho", "gelişmektedir", " ایران",
        " ngoài nhiên")
    add("long", " " * 5000, "=" * 3000 + "x", "a" * 4000, "ab" * 2000, "\n" * 1000, "1" * 1001,
        "🙂" * 500, ("word " * 400).strip())
    add("empty", "", " ", "a")
    return cases


def random_strings(count, seed):
    """Seeded random strings drawn from every class above."""
    rng = random.Random(seed)
    pools = ["abcxyzABCXYZ", "'sStTrReEvVmMlLdD", "0123456789", " \t", "\n\r", "日本語中文한국", "👨‍👩🏽💻❤️",
             "éèêëñçÅø\u0301\u0300", "\x00\x01\x1b\x7f\x85", "(){}[]<>=+-*/.,;:!?\"#$%&_|~^`@\\",
             "\u00a0\u3000\u2028\u200b", "<|eot_id|>"]
    out = []
    for _ in range(count):
        n = rng.randint(1, 40)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(n)))
    return out


def run_tool(tool, args):
    result = subprocess.run([tool] + args, capture_output=True, encoding="utf-8")
    if result.returncode != 0:
        sys.exit(f"FAIL: {tool} {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def fail_mismatch(what, text, ours, ref):
    print(f"FAIL ({what}): text {text!r}\n  shardlm:    {ours}\n  tokenizers: {ref}")
    sys.exit(1)


def check_shards(args, tok, workdir):
    eos, bos = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|begin_of_text|>")
    ids = lambda s: tok.encode(s, add_special_tokens=False).ids
    text_doc = "A plain text file.\nIt's one document, with <|eot_id|> written in it.\n"
    jsonl_docs = ["first record", "second  record\n\nwith newlines", "日本語 🙂"]
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hello.", "input": "", "output": "Hello!"},
              {"instruction": "Name a colour.", "output": " Blue\n"}]
    paths = {"text": os.path.join(workdir, "doc.txt"), "jsonl": os.path.join(workdir, "docs.jsonl"),
             "alpaca": os.path.join(workdir, "alpaca.json"), "alpaca_lines": os.path.join(workdir, "alpaca.jsonl")}
    with open(paths["text"], "w", encoding="utf-8") as f:
        f.write(text_doc)
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t, "meta": 1}) + "\n" for t in jsonl_docs))
    with open(paths["alpaca"], "w", encoding="utf-8") as f:
        json.dump(alpaca, f, indent=1)
    with open(paths["alpaca_lines"], "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in alpaca))

    def expected(with_bos, alpaca_lines=True):
        tokens, mask = [], []
        def doc(prompt, response):
            start = [bos] if with_bos else []
            p, r = ids(prompt) if prompt else [], ids(response)
            tokens.extend(start + p + r + [eos])
            mask.extend([0] * (len(start) + len(p)) + [1] * (len(r) + 1))
        doc("", text_doc)
        for t in jsonl_docs:
            doc("", t)
        for _ in range(2 if alpaca_lines else 1):  # the .json array, then the same records one per line
            for r in alpaca:
                template = ALPACA_WITH_INPUT if r.get("input") else ALPACA_NO_INPUT
                doc(template.format(instruction=r["instruction"], input=r.get("input", "")), r["output"])
        return tokens, mask

    inputs = [paths["text"], paths["jsonl"], paths["alpaca"]]
    for with_bos in (False, True):
        prefix = os.path.join(workdir, "shards_bos" if with_bos else "shards")
        # The JSONL Alpaca file needs --format alpaca: run it as a second invocation into its own prefix.
        run_tool(args.tool, ["--tokenizer", args.tokenizer, "--output", prefix] + (["--add-bos"] if with_bos else [])
                 + inputs)
        run_tool(args.tool, ["--tokenizer", args.tokenizer, "--output", prefix + "_lines", "--format", "alpaca",
                             paths["alpaca_lines"]] + (["--add-bos"] if with_bos else []))
        tokens, mask = [], []
        for p in (prefix, prefix + "_lines"):
            with open(p + ".bin", "rb") as f:
                raw = f.read()
            tokens += [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
            with open(p + ".mask", "rb") as f:
                mask += list(f.read())
        want_tokens, want_mask = expected(with_bos)
        if tokens != want_tokens:
            fail_mismatch(f"shard tokens, bos={with_bos}", "(the shard inputs)", tokens, want_tokens)
        if mask != want_mask:
            fail_mismatch(f"shard mask, bos={with_bos}", "(the shard inputs)", mask, want_mask)
    # Numbered shards hold the same tokens, cut every 7 tokens.
    prefix = os.path.join(workdir, "numbered")
    run_tool(args.tool, ["--tokenizer", args.tokenizer, "--output", prefix, "--shard-tokens", "7"] + inputs)
    files = sorted(f for f in os.listdir(workdir) if f.startswith("numbered-") and f.endswith(".bin"))
    raw = b"".join(open(os.path.join(workdir, f), "rb").read() for f in files)
    numbered = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
    want_tokens, _ = expected(False, alpaca_lines=False)
    if numbered != want_tokens or len(files) != -(-len(want_tokens) // 7):
        print(f"FAIL: numbered shards {files} do not hold the {len(want_tokens)} tokens cut every 7")
        sys.exit(1)
    return len(want_tokens), len(files)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--random", type=int, default=2000)
    args = ap.parse_args()
    if not os.path.exists(args.tokenizer):
        print(f"SKIP: {args.tokenizer} is absent (the Llama 3 tokenizer.json is test data, not in the repository)")
        sys.exit(SKIP)
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(args.tokenizer)
    os.makedirs(args.workdir, exist_ok=True)

    cases = hand_written()
    with open(args.corpus, encoding="utf-8") as f:
        corpus = f.read()
    cases += [("corpus.txt", line) for line in corpus.splitlines(keepends=True)] + [("corpus.txt", corpus)]
    cases += [("random", s) for s in random_strings(args.random, seed=20261121)]
    texts = [t for _, t in cases]

    strings = os.path.join(args.workdir, "strings.jsonl")
    with open(strings, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(t) + "\n" for t in texts))
    encoded = run_tool(args.tool, ["--tokenizer", args.tokenizer, "--encode-jsonl", strings]).stdout.split("\n")[:-1]
    if len(encoded) != len(texts):
        sys.exit(f"FAIL: {len(texts)} strings in, {len(encoded)} lines out")
    ours_all, tokens, specials = [], 0, 0
    special_ids = {tok.token_to_id(t) for t in ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]}
    for (cls, text), line in zip(cases, encoded):
        ours, ref = json.loads(line), tok.encode(text, add_special_tokens=False).ids
        if ours != ref:
            fail_mismatch(f"encode, class {cls}", text, ours, ref)
        ours_all.append(ours)
        tokens += len(ours)
        specials += sum(i in special_ids for i in ours)
    if specials == 0:
        sys.exit("FAIL: no special token was matched in the text (the special cases did not exercise them)")
    with open(args.tokenizer, encoding="utf-8") as f:
        config = json.load(f)
    config["model"]["ignore_merges"] = False
    merges_only = tokenizers.Tokenizer.from_str(json.dumps(config))
    if all(merges_only.encode(t, add_special_tokens=False).ids == tok.encode(t, add_special_tokens=False).ids
           for c, t in cases if c == "ignore_merges"):
        sys.exit("FAIL: the ignore_merges cases encode the same without ignore_merges: they test nothing")

    ids_file = os.path.join(args.workdir, "ids.jsonl")
    with open(ids_file, "w") as f:
        f.write("".join(json.dumps(ids) + "\n" for ids in ours_all))
    decoded = run_tool(args.tool, ["--tokenizer", args.tokenizer, "--decode-jsonl", ids_file]).stdout.split("\n")[:-1]
    for text, ids, line in zip(texts, ours_all, decoded):
        back = json.loads(line)
        if back != text or back != tok.decode(ids, skip_special_tokens=False):
            print(f"FAIL (decode): text {text!r}\n  shardlm decoded:    {back!r}\n"
                  f"  tokenizers decoded: {tok.decode(ids, skip_special_tokens=False)!r}")
            sys.exit(1)
    if len(decoded) != len(texts):
        sys.exit(f"FAIL: {len(texts)} id lists in, {len(decoded)} lines out")

    shard_tokens, numbered = check_shards(args, tok, args.workdir)
    classes = sorted({c for c, _ in cases})
    print(f"encode: {len(texts)} strings ({tokens} tokens, {specials} special tokens) equal to tokenizers "
          f"{tokenizers.__version__} id for id; classes: {', '.join(classes)}")
    print(f"decode: {len(texts)} round trips equal to the text and to tokenizers' decode")
    print(f"shards: text, JSONL and Alpaca (array and lines), with and without BOS: {shard_tokens} tokens and masks "
          f"as expected; --shard-tokens 7 gave {numbered} shards")
    print("PASS")


if __name__ == "__main__":
    main()
