"""How much the state store keeps per contact for the customer trace: the last payload sent, zlib-compressed.

    .venv/bin/python -m benchmarks.payload_storage        # 10,000 sandbox customers, both shipped mappings
"""

from __future__ import annotations

import zlib
from pathlib import Path

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.ometria.payload import encode_contacts
from antavo_ometria.sync.contacts.transform import customer_columns, transform
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria_tools.population import make_customer

PROJECT = Path(__file__).resolve().parents[1]


def main(count: int = 10_000) -> None:
    customers = [normalise_customer(make_customer(i)) for i in range(count)]
    for name, folder in (("shipped (legacy, 16 fields)", "include/mappings"),
                         ("v2 example (22 fields)", "include/mappings/examples/v2")):
        mapping = load_contact_mapping(PROJECT / folder)
        bodies = encode_contacts(transform(customer_columns(customers, mapping.loyalty_fields), mapping), mapping.shape)
        raw = sum(map(len, bodies)) / count
        packed = sum(len(zlib.compress(body)) for body in bodies) / count
        print(f"{name}: {raw:.0f} bytes a record, {packed:.0f} compressed: {packed:.0f} MB per million contacts")


if __name__ == "__main__":
    main()
