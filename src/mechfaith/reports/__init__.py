"""Reports: matplotlib figures (``plots``) and the toy report builder (``toy_report``)."""
