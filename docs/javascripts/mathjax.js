// MathJax's configuration, as Material for MkDocs documents it for pymdownx.arithmatex
// (generic: true): typeset only arithmatex's \( \) and \[ \] elements. MathJax itself is
// shipped with the site (docs/_ext/mathjax_assets.py), never loaded from the network.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache()
  MathJax.typesetClear()
  MathJax.texReset()
  MathJax.typesetPromise()
})
