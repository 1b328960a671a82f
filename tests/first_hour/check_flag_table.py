"""The flag table of shardlm_train in docs/tools.md against `shardlm_train --help`: every flag of --help is in the
table, the table names no flag --help does not have, and each default in the table is --help's.

  check_flag_table.py --train build/bin/shardlm_train --doc docs/tools.md

The table is the first one after the heading `## shardlm_train`; its first column names one or more flags
(`--beta1 X`, `--beta2 X`), its second their defaults in the same order (`—`: none, `off`: a switch).
Prints every difference, exits 1 if there is one."""
import argparse
import re
import subprocess
import sys


def help_flags(text):
    """{flag: default} from cxxopts' --help (None: a switch, no default); continuation lines are joined."""
    flags, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (?:-\w, |    )(--[\w-]+)( arg)?\s*(.*)$", line)  # flags at column 2 or 6
        if m:
            current = m.group(1)
            flags[current] = [bool(m.group(2)), m.group(3)]
        elif current and line.startswith(" " * 10) and line.strip():
            flags[current][1] += " " + line.strip()
        else:
            current = None
    out = {}
    for flag, (takes_value, description) in flags.items():
        m = re.search(r"\(default: (.*)\)$", description)
        out[flag] = (m.group(1).strip().strip('"') if m else "") if takes_value else None
    return out


def table_flags(doc, path):
    """{flag: default} from the first table after `## shardlm_train` (None: `off`, a switch)."""
    lines = doc.splitlines()
    try:
        start = next(i for i, l in enumerate(lines) if re.match(r"^#+ shardlm_train\s*$", l))
    except StopIteration:
        sys.exit(f"{path}: no heading '## shardlm_train'")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    if len(rows) < 3:
        sys.exit(f"{path}: no flag table after '## shardlm_train'")
    out, problems = {}, []
    for row in rows[2:]:  # the header and the |---| line
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        names = re.findall(r"`(--[\w-]+)[^`]*`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1]) or [cells[1]]
        if cells[1] in ("—", "off", ""):
            defaults = [cells[1]] * len(names)
        if len(defaults) != len(names):
            problems.append(f"row {cells[0]}: {len(names)} flag(s) but {len(defaults)} default(s)")
            continue
        for name, default in zip(names, defaults):
            if name in out:
                problems.append(f"{name} is in the table twice")
            out[name] = None if default == "off" else ("" if default in ("—", "") else default)
    return out, problems


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--doc", required=True)
    a = p.parse_args()
    help_text = subprocess.run([a.train, "--help"], check=True, capture_output=True, text=True).stdout
    documented, problems = table_flags(open(a.doc, encoding="utf-8").read(), a.doc)
    actual = help_flags(help_text)
    if len(actual) < 20:
        sys.exit(f"read only {len(actual)} flags from {a.train} --help: has its format changed?\n{help_text}")
    for flag in sorted(actual.keys() - documented.keys()):
        problems.append(f"{flag} (--help) is missing from the table")
    for flag in sorted(documented.keys() - actual.keys()):
        problems.append(f"{flag} is in the table but not in --help (stale)")
    for flag in sorted(actual.keys() & documented.keys()):
        want, got = actual[flag], documented[flag]
        if flag == "--help":
            continue
        if (want is None) != (got is None):
            problems.append(f"{flag}: the table says {'a switch (off)' if got is None else 'it takes a value'}, "
                            f"--help says {'a switch' if want is None else 'it takes a value'}")
        elif want is not None and want != got:
            problems.append(f"{flag}: default '{got}' in the table, '{want}' in --help")
    for line in problems:
        print(f"{a.doc}: {line}")
    if problems:
        sys.exit(1)
    print(f"{a.doc}: the {len(documented)} flags of the shardlm_train table are those of --help, defaults included")


if __name__ == "__main__":
    main()
