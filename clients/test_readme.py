"""Unit tests of readme.py's parsing and matching (no suite needed).

    python3 -m unittest clients/test_readme.py
"""

import json
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme  # noqa: E402

SAMPLE = """# Title

```sh
not-in-the-section --ever
```

## Try it with `buf curl` or `grpcurl`

```sh
TOKEN=$(make-a-token | tail -1)
```

```sh
# A comment.
buf curl --protocol grpc \\
  -d '{}' http://127.0.0.1:50051/betting.v1.WalletService/GetWallet
# => {"wallet": {"balance": "90"}}
bc -d '{}' $U/betting.v1.BettingService/WatchBets
# => {"type": "WATCH_EVENT_TYPE_SNAPSHOT_END"}
# => {"type": "WATCH_EVENT_TYPE_CHANGE"}  # (eventually)
```

```sh
deploy/local/betting bench place --clients 64
```

## Next section

```sh
grpcurl -plaintext 127.0.0.1:50051 list
```
"""


class Parsing(unittest.TestCase):
    def setUp(self):
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.path = Path(directory.name) / "README.md"
        self.path.write_text(SAMPLE)

    def test_only_the_sections_assignment_and_command_blocks(self):
        found = readme.examples(self.path)
        self.assertEqual([e.line for e in found], [10, 15, 18])
        self.assertTrue(found[0].text.startswith("TOKEN="))
        self.assertFalse(found[0].is_command)
        self.assertIn("\n  -d '{}'", found[1].text)  # continuation lines kept
        self.assertEqual(found[1].expect, [{"wallet": {"balance": "90"}}])
        self.assertTrue(found[2].is_stream)
        self.assertTrue(found[2].eventually)
        self.assertEqual(len(found[2].expect), 2)


class Matching(unittest.TestCase):
    def test_objects_are_subsets_lists_are_exact_in_length(self):
        got = json.loads('{"bets": [{"id": "x", "status": "A"}, {"id": "y", "status": "B"}], "n": "2"}')
        self.assertTrue(readme.matches({"n": "2"}, got))
        self.assertTrue(readme.matches({"bets": [{"status": "B"}, {"status": "A"}]}, got))
        self.assertFalse(readme.matches({"bets": [{"status": "A"}]}, got))
        self.assertFalse(readme.matches({"bets": [{"status": "A"}, {"status": "A"}]}, got))
        self.assertFalse(readme.matches({"n": 2}, got))  # "2" is not 2
        self.assertFalse(readme.matches({"missing": None}, got))

    def test_a_drifted_answer_fails_and_text_is_matched_by_line(self):
        unary = readme.Example(1, "bc -d '{}' $U/betting.v1.WalletService/GetWallet")
        unary.expect = [{"wallet": {"balance": "90"}}]
        self.assertIsNone(readme.check(unary, '{"wallet": {"balance": "90"}}', "", 0))
        self.assertIn("no answer matches", readme.check(unary, '{"wallet": {"balance": "91"}}', "", 0))
        self.assertIn("exit 7", readme.check(unary, "", "refused", 7))
        self.assertIn("2 messages", readme.check(unary, '{"wallet": {}} {"wallet": {}}', "", 0))
        listing = readme.Example(2, "grpcurl -plaintext 127.0.0.1:50051 list")
        listing.expect = ["betting.v1.BettingService"]
        self.assertIsNone(readme.check(listing, "betting.v1.AdminService\nbetting.v1.BettingService\n", "", 0))
        self.assertIn("no line", readme.check(listing, "grpc.health.v1.Health\n", "", 0))


if __name__ == "__main__":
    unittest.main()
