"""Effective profile -> Plan: the declarative kernel state of one vNIC. Pure, no I/O."""
