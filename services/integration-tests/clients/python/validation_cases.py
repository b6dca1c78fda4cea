#!/usr/bin/env python3
"""The shared table of request rules, checked with protovalidate-python.

    validation_cases.py --proto-dir proto [--cases services/integration-tests/fixtures/validation-cases.json]
        [--record]

services/integration-tests/fixtures/validation-cases.json lists requests (a
message's full name and a proto3 JSON input) and the protovalidate violations
(field path, rule id, message), in order, that every validator of proto/ must report
for them: meshkit's Rust one, protovalidate-java (the Java starter's
ValidationCasesTest) and this one. The messages are generated from proto/ at
start (stubs.py), buf/validate included. Prints a verdict per case, then
`N passed, M failed`; exits 1 on any mismatch. Needs no running cluster.
With --record, writes the messages protovalidate gives into the table's
violations that have none (for a new case), then checks as usual.
"""

import argparse
import importlib
import json
import os
import sys

import stubs

PROTOS = [
    "meshkit/user/v1/user.proto",
    "meshkit/order/v1/order.proto",
    "meshkit/notification/v1/notification.proto",
    "meshkit/scheduler/v1/scheduler.proto",
]
FIXTURE = os.path.join("services", "integration-tests", "fixtures", "validation-cases.json")


def field_path(path):
    """protovalidate's canonical string of a FieldPath: `a.b`, `items[1].sku`,
    `m["k"]` (a string key quoted, `\\` and `"` escaped); empty for the message."""
    out = []
    for e in path.elements:
        s = e.field_name
        which = e.WhichOneof("subscript")
        if which == "index":
            s += f"[{e.index}]"
        elif which == "bool_key":
            s += "[true]" if e.bool_key else "[false]"
        elif which == "int_key":
            s += f"[{e.int_key}]"
        elif which == "uint_key":
            s += f"[{e.uint_key}]"
        elif which == "string_key":
            s += '["' + e.string_key.replace("\\", "\\\\").replace('"', '\\"') + '"]'
        out.append(s)
    return ".".join(out)


def describe(violations):
    """The Rust servers' INVALID_ARGUMENT message: `field: message [rule_id]` joined by "; "."""
    parts = []
    for v in violations:
        field = field_path(v.field)
        text = f"{v.message} [{v.rule_id}]"
        parts.append(f"{field}: {text}" if field else text)
    return "; ".join(parts)


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.abspath(os.path.join(here, "..", "..", "..", ".."))
    parser = argparse.ArgumentParser()
    parser.add_argument("--proto-dir", default=os.path.join(root, "proto"))
    parser.add_argument("--cases", default=os.path.join(root, FIXTURE))
    parser.add_argument("--record", action="store_true", help="fill in missing messages from protovalidate")
    args = parser.parse_args()

    stubs.load(args.proto_dir, PROTOS)
    for proto in PROTOS:
        importlib.import_module(proto[: -len(".proto")].replace("/", ".") + "_pb2")
    # Only now: protovalidate imports buf.validate.validate_pb2, which stubs.load generated.
    import protovalidate
    from google.protobuf import json_format, message_factory, symbol_database

    pool = symbol_database.Default().pool
    validator = protovalidate.Validator()
    with open(args.cases, encoding="utf-8") as f:
        text = f.read()
        cases = json.loads(text)["cases"]

    passed = failed = 0
    for i, case in enumerate(cases):
        name = case["message"]
        want = [(v["field"], v["rule"], v.get("message")) for v in case["violations"]]
        shown = json.dumps(case["input"], ensure_ascii=False)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        try:
            cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
            msg = json_format.ParseDict(case["input"], cls())
            violations = [v.proto for v in validator.collect_violations(msg)]
            got = [(field_path(v.field), v.rule_id, v.message) for v in violations]
            if args.record and len(got) == len(want):
                for v, g in zip(case["violations"], got):
                    v.setdefault("message", g[2])
                want = [(v["field"], v["rule"], v.get("message")) for v in case["violations"]]
            detail = describe(violations) or "valid"
        except Exception as e:  # a case that cannot be run is a failed case
            got, detail = None, f"{type(e).__name__}: {e}"
        if got == want:
            passed += 1
            print(f"ok   #{i} {name} {shown}: {detail}")
        else:
            failed += 1
            print(f"FAIL #{i} {name} {shown}: want {want}, got {got if got is not None else detail}")
            if got is not None:
                print(f"       {detail}")
    if args.record:
        head = text[: text.index('"cases"')]
        lines = [json.dumps(c, ensure_ascii=False) for c in cases]
        with open(args.cases, "w", encoding="utf-8") as f:
            f.write(head + '"cases": [\n    ' + ",\n    ".join(lines) + "\n  ]\n}\n")
    print(f"validation-cases: {passed} passed, {failed} failed")
    return 1 if failed or not cases else 0


if __name__ == "__main__":
    sys.exit(main())
