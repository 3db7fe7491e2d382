"""napari front end: the interactive labelling loop on the same engine as the CLI.

``controller.LabellingController`` holds the state and does the work without any Qt (testable on
its own); ``widget.LabellingWidget`` is the thin Qt dock widget napari shows.  Importing this
package does not import napari: install the extra (``pip install 'cryoal_ext[napari]'``) for the widget.
"""
