# ts_set_warnings(target): the project's warning set; errors with TS_WERROR (CI builds).
function(ts_set_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
                                           -Wnon-virtual-dtor -Wcast-align -Wformat=2)
  if(TS_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
