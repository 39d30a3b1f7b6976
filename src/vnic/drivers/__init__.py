"""Drivers: the hypervisor side that turns a launch request into a running VM."""
