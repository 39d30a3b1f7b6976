"""Dynamic adjustment of running vNICs: threshold rules with hysteresis, feedback from
inside VMs, timed scenarios and Mahimahi trace replay.

The modules here are pure (no I/O, the clock injected): :mod:`.rules` and
:mod:`.engine` turn samples into decisions, :mod:`.feedback` checks what a VM
asks for, :mod:`.scenario` and :mod:`.trace` play timelines. :mod:`.runner`
carries their decisions out in the manager.
"""
