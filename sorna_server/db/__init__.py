"""Durable records: tables, engines and the small queries shared by several parts."""
