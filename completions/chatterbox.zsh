#compdef chatterbox

_chatterbox_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _CHATTERBOX_COMPLETE=complete_zsh chatterbox)
}

compdef _chatterbox_completion chatterbox
