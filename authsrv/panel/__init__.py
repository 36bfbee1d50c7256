"""The Administration Panel for operators (docs/panel.md): server-rendered HTML under /panel/."""
