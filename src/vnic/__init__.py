"""vnic: virtual NICs with named network profiles for VM sessions."""

__version__ = "0.1.0"
