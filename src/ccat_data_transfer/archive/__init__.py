"""Stage 5, archive: move packages from an LTA-site buffer into the site's long-term
archive, and prove archive copies (``proof``, public to the deletion and fixity stages)."""
