#!/usr/bin/env python3
"""Runs README.md's examples as a newcomer would, and checks their answers.

    readme.py README.md ADDRESS --work DIR

The examples are the ```sh blocks of the section "## Try it with `buf curl`
or `grpcurl`" that hold a `buf curl`, `grpcurl` or `bc` command, a
`deploy/local/betting audit` or `queue` command, or only shell variable
assignments (the tokens). Every line of those blocks that is not a comment
runs, in document order, in one
bash (so `CASHIER=$(deploy/local/betting token ...)` and `bc() {...}` carry
on to the commands after them), from the repository root, with one change:
the README's address 127.0.0.1:50051 becomes ADDRESS, a fresh suite's
(clients/check sets `deploy/local/betting` up for it).

A command must exit 0 and, if it calls the API, print something: JSON (one
message for a unary call), or text (`grpcurl ... list`). A line `# => JSON` under a command
is what its answer must contain: every field it names, with that value
(objects: a subset; lists: as many elements, each matching its own one;
ids, timestamps and whatever else it leaves out are not compared; under a
command that prints text, a JSON string is a line it must print). Several
`# =>` lines under a streaming command (a `/Watch...` method) must each
match one of its messages; the stream is read until they all have, or 15 s,
then stopped with SIGINT as a newcomer's Ctrl-C would. Reads that name
`# (eventually)` on their `# =>` line (matching and payouts are
asynchronous) are repeated for up to 15 s until their answer matches.
Prints one line per command (and, with --show, each answer); exits 1 if
any failed.
"""

import argparse
import json
import os
import re
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

SECTION = "## Try it with `buf curl` or `grpcurl`"
README_ADDRESS = "127.0.0.1:50051"
COMMAND = re.compile(r"^(buf curl|grpcurl|bc|deploy/local/betting (audit|queue))\s")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*=")
EXPECT = "# =>"
EVENTUALLY = "# (eventually)"
STEP_TIMEOUT = 60  # seconds, for any one command
WAIT = 15  # seconds, for eventual answers and streams


class Example:
    def __init__(self, line, text):
        self.line = line  # README line number of its first line
        self.text = text  # as written, continuation lines joined
        self.expect = []  # parsed `# =>` values
        self.eventually = False

    @property
    def is_command(self):
        return bool(COMMAND.match(self.text))

    @property
    def is_rpc(self):
        return self.is_command and not self.text.startswith("deploy/")

    @property
    def is_stream(self):
        return self.is_command and "/Watch" in self.text

    def label(self):
        one_line = " ".join(self.text.replace("\\\n", " ").split())
        return f"README.md:{self.line}: {one_line[:110]}"


def examples(readme):
    """The example lines of the section, in order."""
    lines = readme.read_text().splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        sys.exit(f"error: {readme} has no section {SECTION!r}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    found, block, in_sh = [], [], False
    for number in range(start + 1, end):
        line = lines[number]
        if not in_sh and line.strip() == "```sh":
            in_sh, block = True, []
            continue
        if in_sh and line.strip() == "```":
            in_sh = False
            if any(e.is_command for e in block) or (block and all(ASSIGNMENT.match(e.text) for e in block)):
                found.extend(block)
            continue
        if not in_sh:
            continue
        stripped = line.strip()
        if stripped.startswith(EXPECT):
            if not block:
                sys.exit(f"error: README.md:{number + 1}: `# =>` with no command above it")
            body = stripped[len(EXPECT):]
            if body.rstrip().endswith(EVENTUALLY):
                body = body.rstrip()[: -len(EVENTUALLY)]
                block[-1].eventually = True
            try:
                block[-1].expect.append(json.loads(body))
            except json.JSONDecodeError as error:
                sys.exit(f"error: README.md:{number + 1}: `# =>` is not JSON: {error}")
            continue
        if not stripped or stripped.startswith("#"):
            continue
        if block and block[-1].text.endswith("\\"):
            block[-1].text += "\n" + line
        else:
            block.append(Example(number + 1, line))
    return found


def messages(text):
    """The JSON values printed one after another (buf curl and grpcurl pretty-print each message)."""
    decoder, values, index = json.JSONDecoder(), [], 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return values
        value, index = decoder.raw_decode(text, index)
        values.append(value)


def matches(want, got):
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and matches(v, got[k]) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(got, list) or len(want) != len(got):
            return False
        left = list(got)
        for item in want:
            hit = next((g for g in left if matches(item, g)), None)
            if hit is None:
                return False
            left.remove(hit)
        return True
    return want == got


class Shell:
    """One bash that runs the examples one at a time, keeping its variables."""

    def __init__(self, root, env, work):
        self.work = work
        self.count = 0
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

    def send(self, script):
        self.count += 1
        marker = f"__readme_step_{self.count}__"
        self.proc.stdin.write(f"{script}\necho {marker}\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + STEP_TIMEOUT
        noise = []
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                sys.exit(f"error: a step took over {STEP_TIMEOUT} s:\n{script}")
            line = self.proc.stdout.readline()
            if not line:
                sys.exit(f"error: the shell exited during:\n{script}\n{''.join(noise)}")
            if line.strip() == marker:
                return "".join(noise)
            noise.append(line)

    def files(self, n):
        return (self.work / f"{n}.out", self.work / f"{n}.err", self.work / f"{n}.rc")

    def run(self, n, text):
        out, err, rc = self.files(n)
        self.send(f"{{ {text}\n}} >{out} 2>{err}; echo $? >{rc}")
        return out.read_text(), err.read_text(), int(rc.read_text())

    def start(self, n, text):
        """A stream in the background, in its own process group (so SIGINT reaches it)."""
        out, err, _ = self.files(n)
        self.send(f"set -m\n{{ {text}\n}} >{out} 2>{err} &\n__readme_stream=$!\nset +m")

    def stop(self, n):
        out, err, rc = self.files(n)
        self.send(f'kill -INT -- "-$__readme_stream" 2>/dev/null; wait "$__readme_stream"; echo $? >{rc}')
        return out.read_text(), err.read_text(), int(rc.read_text())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def check(example, out, err, rc, stopped=False):
    """None if the answer is right, else why not."""
    # A stream we stopped ends by the signal (130, or buf's own exit status).
    if rc != 0 and not stopped:
        return f"exit {rc}: {err.strip() or out.strip()}"
    if not example.is_command:
        return None  # an assignment or a definition: its exit status is all
    if not out.strip() and not example.is_rpc and not example.expect:
        return None  # `queue dead` with none dead
    try:
        printed = messages(out)
    except json.JSONDecodeError:
        printed = None
    if printed is None or (printed and all(isinstance(p, (int, float)) for p in printed)):
        # Text (a number alone is text too: `queue stats` prints none, the
        # audit may print a count).
        lines = [line.strip() for line in out.splitlines()]
        if not any(lines) and (example.is_rpc or example.expect):
            return f"printed nothing: {err.strip()[:300]}"
        for want in example.expect:
            if not isinstance(want, str):
                return f"printed text, not JSON, so `# =>` must be a string: {out.strip()[:300]}"
            if want not in lines:
                return f"no line {json.dumps(want)}; got {out.strip()[:600]}"
        return None
    if not printed:
        return f"printed nothing: {err.strip()[:300]}"
    if example.is_rpc and not example.is_stream and len(printed) != 1:
        return f"{len(printed)} messages for a unary call"
    for want in example.expect:
        if not any(matches(want, got) for got in printed):
            return f"no answer matches {json.dumps(want)}; got {json.dumps(printed)[:600]}"
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("readme", type=Path)
    parser.add_argument("address")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--show", action="store_true", help="print each answer (for writing `# =>` lines)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    root = args.readme.resolve().parent
    found = examples(args.readme)
    commands = sum(e.is_command for e in found)
    kinds = {k: sum(1 for e in found if e.text.startswith(k)) for k in ("buf curl", "bc ", "grpcurl")}
    print(f"  {len(found)} lines, {commands} commands ({kinds['buf curl']} buf curl, {kinds['bc ']} bc, "
          f"{kinds['grpcurl']} grpcurl), {sum(len(e.expect) for e in found)} expected answers")
    if kinds["buf curl"] == 0 or kinds["grpcurl"] == 0:
        sys.exit("error: found no buf curl or no grpcurl example: has the README's layout changed?")

    shell = Shell(root, dict(os.environ), args.work)
    failed = 0
    for n, example in enumerate(found):
        text = example.text.replace(README_ADDRESS, args.address)
        started = time.monotonic()
        if example.is_stream:
            shell.start(n, text)
            out_file = shell.files(n)[0]
            while time.monotonic() - started < WAIT:
                time.sleep(0.2)
                try:
                    printed = messages(out_file.read_text())
                except json.JSONDecodeError:
                    continue  # a message half written
                if example.expect and all(any(matches(w, g) for g in printed) for w in example.expect):
                    break
            problem = check(example, *shell.stop(n), stopped=True)
        else:
            while True:
                problem = check(example, *shell.run(n, text))
                if problem is None or not example.eventually or time.monotonic() - started > WAIT:
                    break
                time.sleep(0.3)
        seconds = time.monotonic() - started
        if args.show:
            print(shell.files(n)[0].read_text().rstrip())
        if problem is None:
            print(f"  ok   {example.label()} ({seconds:.1f} s)")
        else:
            failed += 1
            print(f"  FAIL {example.label()}\n       {problem}", file=sys.stderr)
    shell.close()
    if failed:
        sys.exit(f"error: {failed} README example(s) failed (run order: README.md's; address {shlex.quote(args.address)})")
    print(f"  all {len(found)} example lines ran as README.md shows them")


if __name__ == "__main__":
    main()
