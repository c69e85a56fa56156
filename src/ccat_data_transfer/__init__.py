"""ccat_data_transfer: the observatory Data Transfer System.

Raw data is filed at SOURCE locations, packed into tar packages, sent to long-term
archives at several sites, staged for scientists, and removed from temporary buffers only
when it is provably safe.  See ``ccat_data_transfer.cli`` for the command line.
"""

__version__ = "0.1.0"
